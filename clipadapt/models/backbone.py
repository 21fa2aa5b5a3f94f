"""CLIPBackbone: an open_clip model with its encoders written as an explicit layer loop where open_clip allows.

Any contrastive open_clip model builds (every native ViT and tag, ResNet CLIP, timm image towers as in
EVA02 / SigLIP / ViT-SO400M, CustomTextCLIP and Hugging Face text towers, the latter with `transformers`
installed). The layer loop below, and so every seam, covers the native towers only: a `VisionTransformer` image tower (`image_native`) and the
text transformer a native `CLIP` holds in itself (`text_native`; RN50's, not a CustomTextCLIP's
`model.text`). Any other tower runs its own forward (`model.visual(images)`, `model.encode_text`),
equal to open_clip's `encode_image` / `encode_text` by construction; a seam asked of it raises
ClipAdaptError naming what is supported, and methods that need seams declare the towers
(`require_native`). `tower_blocks` lists any tower's residual blocks (CLIP-AST's units). `logits`
adds the model's `logit_bias` (SigLIP) to scale·cos, as open_clip's `get_logits`.

Names go through one resolver (`_resolve`): an open_clip name with a tag or weights file; a model
config JSON of one's own (`model_config`, registered with `open_clip.add_model_config` under its file
stem, which becomes the arch); `local-dir:PATH` (open_clip_config.json + a weights file, as open_clip);
`hf-hub:org/repo`, looked up in the Hugging Face cache and downloaded only after the short probe, then
built as `local-dir:` of the cached snapshot (so open_clip's own ~50 s retries never run offline).

This is the one module in clipadapt that knows open_clip's internals. It is pinned to
open_clip_torch==3.3.0 and reads these private seams of the native `CLIP` / `VisionTransformer`
(and `open_clip.factory.parse_model_name` / `_find_checkpoint_in_dir` for the schema names):
`visual._embeds` and `visual._pool` (image; deep prompts re-run `_embeds`' steps, conv1 to ln_pre,
with `open_clip.transformer._expand_token`), `open_clip.transformer.text_global_pool` (text), the
`attn_mask` buffer, `text_pool_type` / `text_eos_id`, and each tower's `transformer.resblocks`
(batch-first blocks called as `block(x, attn_mask=...)`). Pretrained weights are resolved through
`open_clip.get_pretrained_cfg` / `download_pretrained` and huggingface_hub's cache; the tags of
`BUNDLED_TAGS` (`clipadapt-toy` / `toy`, the toy CLIP of `clipadapt.toy`) are files in the package.

Prompts enter through three seams, each off by default (then the unchanged path below runs):
- `prompts=` (K/V, Adapt; an object with `kv_tokens(tower, layer)`, e.g.
  `clipadapt.models.prompts.MaskedPrompts`): a block with prompts runs its attention with queries from
  the real tokens and keys/values from LN1([P ; x]) (`_prompted_block`).
- `encode_text_embeddings(embeddings, eot)` (learned text context, CoOp family): the caller builds the
  input token embeddings (`clipadapt.models.context.place_context`) and says where each row's EOT
  now is; positional embeddings, the causal mask, EOT truncation and pooling are the tower's own.
- `deep=` (deep prompts, VPT-deep / MaPLe / PromptSRC): a list of (P, W) tokens per block j < J.
  Image tower: deep[0] is appended after the class + patch tokens, before `ln_pre` (MaPLe's order);
  at each block 0 < j < J the outputs of the P prompt slots are replaced by deep[j]; they are
  dropped before pooling. Text tower: deep[0] must be None (layer 0's prompts are the learned context
  right after SOT, part of the embeddings), and at blocks 0 < j < J positions 1..P are replaced.
  Replacing in place keeps the sequence length, the causal mask and the EOT positions as they are.

Low-rank q/k/v deltas enter through `lora=` (an object with `qkv_delta(tower, layer)`, e.g.
`clipadapt.models.lora.LowRankQKV`): a block with a delta computes its attention explicitly
(`_low_rank_block`), with the delta added to the fused q/k/v input projection. It is the path for
a delta that depends on the input (LoRA's dropout); a plain weight change (merged LoRA) goes through
the unchanged path with replaced weights instead (`qkv_weights` names them).

Plain blocks run by default (`attention="sdpa"`) through the explicit batch-first block of the low-rank
path with no delta (`_low_rank_block`): no seq-first round trips inside nn.MultiheadAttention, and
- F.scaled_dot_product_attention gets what CUDA's flash / memory-efficient kernels need in bf16/fp16:
  no mask in the image tower, `is_causal=True` instead of the additive (L, L) mask in the text tower
  when that mask is open_clip's plain causal one (checked once at construction; the prompted block
  keeps its [0 | causal] mask), and q, k, v as (B, H, L, W/H) views with unit last stride (copies to
  contiguous tensors measured slower on CPU, and the kernels take the views as they are);
- the four projections per block go through `_linear`: oneDNN's fp32 GEMM on an x86 CPU for GEMMs of
  2^20 multiply-adds and more (with its exact-GELU post-op without gradients), F.linear elsewhere (GPU,
  autocast, small GEMMs). On this project's AMD EPYC MKL's sgemm, which F.linear and
  nn.MultiheadAttention use, runs at about half oneDNN's rate: that is most of the default's lead.
Equal to open_clip up to float rounding (~1e-6; tests/test_towers.py holds the tolerance), faster
(benchmarks/towers.py). `attention="module"` runs open_clip's own modules instead, bit-exact. The
option changes no parameter: state dicts, checkpoints and exports are the same under both.

`compile` (off by default) runs the plain path of each native tower through `torch.compile` (inductor,
`fullgraph=True`, `dynamic=None`): the image tower from patch embedding to the projection
(`_image_tower`) and the text tower's blocks + ln_final (`_text_stack`, shared by `encode_text` and
`encode_text_embeddings`). The EOT truncation stays eager (its length is data), so the text graph
sees (N, L) shapes that vary per evaluation set: torch compiles the first shape static and, at the
second, recompiles with the changed dims symbolic, so an evaluation set of its own costs no new
compile; the recompile limit is raised to `COMPILE_RECOMPILE_LIMIT` for these two functions (grad
mode, autocast, train/eval and the trainable subset each guard an entry of their own). Calls with
K/V prompts, deep prompts or low-rank deltas run eager (they are the methods' seams, not the
tower's cost). The compiled functions are module-level and take the tower as an argument, so no
module is wrapped: state dicts, checkpoints and deep copies are those of the eager model. Equal to
eager up to float rounding (tests/test_compile.py); where it pays: benchmarks/compile.py.

With no prompts and `attention="module"`, `encode_image` and `encode_text(..., truncate=False)` are bit-identical to
open_clip's own `encode_image` / `encode_text` in fp32; tests/test_backbone.py guards this, and
tests/test_context.py checks the context and deep seams against open_clip's own forward with hooks.
Bump the pin only with both green (and tests/test_towers.py, which also reads `mkldnn::_linear_pointwise`).

Deliberate choices:
- `encode_text(truncate=True)` cuts the sequence after the last EOT of the batch. The text tower is
  causal and pools at the EOT token, so later tokens cannot change the result: equal up to float
  rounding, and several times faster for short prompts (spec data.md §7).
- A tag whose weights were trained with QuickGELU (`openai`, ...) forces QuickGELU even on an arch
  without the `-quickgelu` suffix; open_clip 3.x would only warn and build GELU.
- A weights file is never run as code: open_clip reads state dicts with weights_only=True (a local file
  is first checked by `clipadapt.checkpoints.read_weights`, so a file that is not weights ends in one
  line), and a TorchScript archive (OpenAI's download) is never given to `torch.jit.load`, which would
  run the archive's code: `clipadapt.checkpoints.read_torchscript` reads its tensors as data.
- Weights that are not in the local cache fail within seconds when the Hub cannot be reached
  (open_clip itself retries for ~50 s), with a message on how to provide them.
"""

import difflib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import huggingface_hub
import open_clip
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError
from open_clip.hf_model import HFTextEncoder
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer, _expand_token, text_global_pool
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from clipadapt.checkpoints import is_torchscript, read_torchscript, read_weights
from clipadapt.errors import ClipAdaptError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0  # one HEAD request decides "Hub reachable or not" before any download starts
_HF_DEFAULT_FILENAME = "open_clip_pytorch_model.bin"  # open_clip's name when a hf_hub entry ends in "/"
_TEXT_PARAMETER_ROOTS = (
    "token_embedding",
    "positional_embedding",
    "transformer",
    "ln_final",
    "text_projection",
    "text",
)
# Containers whose children are a tower's residual blocks: native/timm ViTs, ResNet stages, HF encoders.
_BLOCK_CONTAINER = re.compile(r"^(resblocks|blocks|layers|layer|block|layer\d+)$")
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")  # torch.compile modes without CUDA graphs
COMPILE_RECOMPILE_LIMIT = 64  # per compiled tower function; torch's default of 8 counts every guard combination
_NATIVE = {
    "image": "a native open_clip ViT image tower (VisionTransformer: ViT-B-32, ViT-B-16, ViT-L-14, ...)",
    "text": "open_clip's own text transformer inside CLIP (as in ViT-B-16 or RN50, not a CustomTextCLIP)",
}


class KVPrompts(Protocol):
    """What the encoders need from prompts: a tower's live K/V tokens at one block, or None for none."""

    def kv_tokens(self, tower: str, layer: int) -> Tensor | None:
        """(P, W) extra key/value tokens of `tower` ("image" | "text") at block `layer`; None when none are live."""
        ...


class QKVDeltas(Protocol):
    """What the encoders need from low-rank deltas: a block's addition to its fused q/k/v projection, or None."""

    def qkv_delta(self, tower: str, layer: int) -> Callable[[Tensor], Tensor] | None:
        """LN1 output (B, L, W) -> (B, L, 3W) addition to [q | k | v] at block `layer` of `tower`; None for none."""
        ...


class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable right now."""


class CLIPBackbone(nn.Module):
    """An open_clip CLIP (fp32) with layer-loop encoders, tokenizer and tower parameter views."""

    def __init__(
        self,
        arch: str = "ViT-B-16-quickgelu",
        pretrained: str | None = "openai",
        cache_dir: str | None = None,
        model_config: str | None = None,
        attention: str = "sdpa",
        compile: str = "off",
        text_chunk: int = 0,
    ) -> None:
        """Build `arch` (or the model of a `model_config` JSON file) with weights from an open_clip tag, a file, or None.

        `attention`: `sdpa` (default) spells each plain block of a native tower out batch-first over
        F.scaled_dot_product_attention (fused kernels, oneDNN projections on an x86 CPU; equal to open_clip up
        to float rounding, faster: benchmarks/towers.py); `module` runs the blocks as open_clip does
        (nn.MultiheadAttention; bit-exact with open_clip). No parameter depends on it.
        `compile`: `off`, or a torch.compile mode (`default`, `max-autotune-no-cudagraphs`) for the towers'
        plain paths (module docstring; equal up to float rounding; where it pays: benchmarks/compile.py).
        `text_chunk`: 0 (off), or under grad the text tower runs that many sequences at a time, each chunk
        recomputed in backward (`_text_in_chunks`).
        """
        super().__init__()
        if attention not in ("module", "sdpa"):
            raise ValueError(f"attention must be 'module' or 'sdpa', got {attention!r}")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
        if compile != "off" and not torch._dynamo.is_dynamo_supported():
            raise ClipAdaptError(
                f"compile={compile!r}: torch.compile does not run on this Python / torch ({torch.__version__}): "
                "use compile: off"
            )
        self.attention = attention
        self.compile_mode = compile  # not `self.compile`: that is nn.Module's own method
        if text_chunk < 0:
            raise ValueError(f"text_chunk must be 0 (off) or a number of sequences, got {text_chunk}")
        self.text_chunk = text_chunk
        spec = _resolve(arch, pretrained, model_config, cache_dir)
        self.arch: str = spec.arch  # the name the user knows it by (the JSON file's stem for `model_config`)
        kwargs = dict(spec.kwargs)
        path = kwargs.pop("pretrained", None)
        # open_clip would torch.jit.load an archive, which runs the code inside it: its tensors are read here instead.
        archive = path if path is not None and is_torchscript(path) else None
        try:
            weights = None if archive else path
            self.model = open_clip.create_model(
                spec.name, weights, precision="fp32", device="cpu", cache_dir=cache_dir, **kwargs
            )
            if archive:
                _load_archive(self.model, archive, self.arch)
        except RuntimeError as err:
            if "state_dict" not in str(err):
                raise
            detail = "; ".join(line.strip() for line in str(err).splitlines()[1:])[:300]
            raise ClipAdaptError(
                f"pretrained {path} does not fit arch {self.arch!r} ({detail}): pass weights of {self.arch}"
            ) from None
        self.tokenizer = open_clip.get_tokenizer(spec.name)
        visual = self.model.visual
        # Which towers the explicit layer loop (and so every seam: prompts, deep, lora, context) covers.
        self.image_native: bool = isinstance(visual, VisionTransformer)
        self.text_native: bool = isinstance(self.model, open_clip.CLIP)  # CLIP holds open_clip's own text transformer
        self.embed_dim: int = spec.cfg["embed_dim"]
        size = visual.image_size
        self.image_size: int = size if isinstance(size, int) else size[0]  # CLIP configs are square
        self.width_image: int | None = visual.transformer.width if self.image_native else None
        self.width_text: int | None = self.model.transformer.width if self.text_native else None
        self.context_length: int = self.model.context_length
        # The text mask is open_clip's plain causal one (read once): the sdpa path passes is_causal=True instead.
        self._causal_text: bool = self.text_native and _is_causal(self.model.attn_mask)

    @property
    def native(self) -> bool:
        """Whether both towers run the explicit layer loop, so every seam exists (a native open_clip ViT CLIP)."""
        return self.image_native and self.text_native

    def tower_kind(self, tower: str) -> str:
        """What builds `tower` ("image" | "text"), in words: "a timm eva02 image tower", ..."""
        if tower == "image":
            visual = self.model.visual
            if isinstance(visual, TimmModel):
                return f"a timm {type(visual.trunk).__name__} image tower"
            return f"a {type(visual).__name__} image tower"
        if tower == "text":
            text = getattr(self.model, "text", None)
            if isinstance(text, HFTextEncoder):
                return f"a Hugging Face {type(text.transformer).__name__} text tower"
            if text is not None:
                return f"a separate {type(text).__name__} text tower (CustomTextCLIP)"
            return "open_clip's own CLIP text transformer"
        raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")

    def require_native(self, method: str, towers: Sequence[str] = ("image", "text")) -> None:
        """Fail in one line unless every tower in `towers` runs the explicit layer loop (the seams `method` needs)."""
        native = {"image": self.image_native, "text": self.text_native}
        for tower in towers:
            if not native[tower]:
                raise ClipAdaptError(f"{method} needs {_NATIVE[tower]}; {self.arch} has {self.tower_kind(tower)}")

    def _no_seam(self, tower: str, seam: str) -> ClipAdaptError:
        return ClipAdaptError(f"{seam} needs {_NATIVE[tower]}; {self.arch} has {self.tower_kind(tower)}")

    @property
    def logit_scale(self) -> nn.Parameter:
        """The model's log temperature; a property so the parameter keeps one name (`model.logit_scale`)."""
        return self.model.logit_scale

    @property
    def logit_bias(self) -> nn.Parameter | None:
        """The model's logit bias (SigLIP's sigmoid loss trains one), or None."""
        return getattr(self.model, "logit_bias", None)

    def logits(self, image: Tensor, text: Tensor) -> Tensor:
        """(B, D), (C, D) unit features -> (B, C) exp(logit_scale)·cos (+ logit_bias), as open_clip's get_logits."""
        logits = self.logit_scale.exp() * image @ text.T  # (B, C)
        bias = self.logit_bias
        return logits if bias is None else logits + bias

    def tokenize(self, texts: list[str]) -> Tensor:
        """Strings -> (N, 77) token ids on CPU (SOT ... EOT, zero padded)."""
        return self.tokenizer(texts)

    def encode_image(
        self,
        images: Tensor,
        normalize: bool = True,
        prompts: KVPrompts | None = None,
        deep: Sequence[Tensor | None] | None = None,
        lora: QKVDeltas | None = None,
    ) -> Tensor:
        """(B, 3, H, W) -> (B, D); mirrors VisionTransformer.forward block by block; optional K/V or deep prompts, or deltas."""
        _check_one_seam(prompts, lora)
        visual = self.model.visual
        if not self.image_native:
            if prompts is not None or deep is not None or lora is not None:
                raise self._no_seam("image", "image prompts and low-rank deltas")
            pooled = visual(images)  # (B, D): the tower's own forward, as CLIP.encode_image
            return F.normalize(pooled, dim=-1) if normalize else pooled
        if deep is None and prompts is None and lora is None:
            pooled = self._tower_call(_image_tower, visual, images, self.attention)  # (B, D)
            return F.normalize(pooled, dim=-1) if normalize else pooled
        if deep is None:
            x = visual._embeds(images)  # (B, 1 + N, W): class token + patch tokens
            slots = 0
        else:
            x = self._prompted_image_embeds(images, deep)  # (B, 1 + N + P, W)
            slots = deep[0].shape[0]
        for index, block in enumerate(visual.transformer.resblocks):
            if slots and 0 < index < len(deep) and deep[index] is not None:
                x = torch.cat([x[:, :-slots], _per_row(deep[index], x).to(x.dtype)], dim=1)
            tokens = prompts.kv_tokens("image", index) if prompts is not None else None
            if tokens is None:
                delta = lora.qkv_delta("image", index) if lora is not None else None
                x = _run_block(visual.transformer, block, x, None, delta, self.attention)  # (B, 1 + N (+ P), W)
            else:
                x = _run_prompted_block(visual.transformer, block, x, tokens, attn_mask=None)  # (B, 1 + N, W)
        if slots:
            x = x[:, :-slots]  # the prompt slots are never pooled
        pooled, _ = visual._pool(x)  # (B, W)
        if visual.proj is not None:
            pooled = pooled @ visual.proj  # (B, D)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def encode_text(
        self,
        tokens: Tensor,
        normalize: bool = True,
        truncate: bool = True,
        prompts: KVPrompts | None = None,
        lora: QKVDeltas | None = None,
    ) -> Tensor:
        """(N, 77) token ids -> (N, D); mirrors CLIP.encode_text, optionally cut after the last EOT and prompted."""
        _check_one_seam(prompts, lora)
        return self._text_in_chunks(self._encode_text, (tokens,), normalize, truncate, prompts, lora)

    def _encode_text(
        self, tokens: Tensor, normalize: bool, truncate: bool, prompts: KVPrompts | None, lora: QKVDeltas | None
    ) -> Tensor:
        model = self.model
        if not self.text_native:
            if prompts is not None or lora is not None:
                raise self._no_seam("text", "text prompts and low-rank deltas")
            return model.encode_text(tokens, normalize=normalize)  # (N, D): the tower's own forward
        attn_mask = model.attn_mask  # (77, 77) additive causal mask, or None for bidirectional towers
        positional = model.positional_embedding  # (77, W)
        if truncate:
            length = self._pooled_length(tokens)
            if length is not None:
                tokens, positional = tokens[:, :length], positional[:length]  # (N, L), (L, W)
                attn_mask = attn_mask[:length, :length]  # (L, L)
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)  # (N, L, W)
        x = x + positional.to(cast_dtype)
        x = self._text_blocks(x, attn_mask, prompts, lora=lora)  # (N, L, W)
        pooled = text_global_pool(x, tokens, model.text_pool_type, eos_token_id=getattr(model, "text_eos_id", None))
        return self._project_text(pooled, normalize)

    def encode_text_embeddings(
        self,
        embeddings: Tensor,
        eot: Tensor,
        normalize: bool = True,
        truncate: bool = True,
        deep: Sequence[Tensor | None] | None = None,
    ) -> Tensor:
        """(N, L, W) input token embeddings (learned context in place) + (N,) EOT positions -> (N, D).

        The tower adds its positional embeddings, runs under its causal mask and pools at `eot`;
        `truncate` cuts every column after the last EOT (exact: causal). `deep` as in the module docstring.
        """
        return self._text_in_chunks(self._encode_text_embeddings, (embeddings, eot), normalize, truncate, deep)

    def _text_in_chunks(self, encode: Callable[..., Tensor], rows: tuple[Tensor, ...], *shared: Any) -> Tensor:
        """`encode(*rows, *shared)`; under grad with more than `text_chunk` rows, chunk by chunk, each recomputed in backward.

        Only a chunk's inputs and (N, D) outputs are kept between forward and backward, so the text side's
        activation memory follows `text_chunk`, not the class count (1000 ImageNet classes in one step).
        A chunk truncates at its own last EOT, which is exact under the causal mask; the non-reentrant
        checkpoint replays a chunk's RNG state, so dropout draws the same masks in the recomputation
        (CLIP-LoRA's dropout: each chunk draws its own masks, the same distribution as one pass, other draws).
        A recomputation sees the module's weights as they are in backward: after a forward inside
        `torch.func.functional_call` (`models.weights.call_with_weights`) those are no longer the swapped
        ones, and the gradients would be silently wrong, so the recomputation refuses that instead.
        """
        if not self.text_chunk or rows[0].shape[0] <= self.text_chunk or not torch.is_grad_enabled():
            return encode(*rows, *shared)
        weights = list(self.model.parameters())  # the tensors this forward runs with (swapped ones included)

        def run(*args: Any) -> Tensor:
            now = list(self.model.parameters())
            if len(now) != len(weights) or any(a is not b for a, b in zip(now, weights, strict=True)):
                raise ClipAdaptError(
                    "a checkpointed text chunk (text_chunk) would be recomputed under other weights than its "
                    "forward's, which ran inside torch.func.functional_call: train through a seam (prompts=, "
                    "lora=) instead of swapped weights, or set text_chunk 0"
                )
            return encode(*args)

        chunks = zip(*(row.split(self.text_chunk) for row in rows), strict=True)
        return torch.cat([checkpoint(run, *chunk, *shared, use_reentrant=False) for chunk in chunks])

    def _encode_text_embeddings(
        self, embeddings: Tensor, eot: Tensor, normalize: bool, truncate: bool, deep: Sequence[Tensor | None] | None
    ) -> Tensor:
        if not self.text_native:
            raise self._no_seam("text", "learned text context (encode_text_embeddings)")
        model = self.model
        length = embeddings.shape[1]
        if model.attn_mask is None and length != self.context_length:
            raise ValueError(f"a bidirectional text tower needs all {self.context_length} columns, got {length}")
        if int(eot.max()) >= length:
            raise ValueError(f"an EOT position ({int(eot.max())}) lies outside the {length} embedding columns")
        if truncate and model.attn_mask is not None:
            length = int(eot.max()) + 1
        attn_mask = model.attn_mask[:length, :length] if model.attn_mask is not None else None  # (L, L)
        cast_dtype = model.transformer.get_cast_dtype()
        x = embeddings[:, :length].to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)  # (N, L, W)
        if deep is not None and deep[0] is not None:
            raise ValueError("text deep prompts start at block 1: block 0's are the learned context in the embeddings")
        x = self._text_blocks(x, attn_mask, None, deep)  # (N, L, W)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot.to(x.device, non_blocking=True)]  # (N, W)
        return self._project_text(pooled, normalize)

    def token_embeddings(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N, L, W) rows of the (frozen) token embedding table, before positions."""
        if not self.text_native:
            raise self._no_seam("text", "learned text context (token_embeddings)")
        return self.model.token_embedding(tokens.to(self.model.positional_embedding.device))

    def eot_positions(self, tokens: Tensor) -> Tensor:
        """(N, L) token ids -> (N,) position each row pools at (its EOT); only EOT-pooled towers have one."""
        model = self.model
        if not self.text_native:
            raise self._no_seam("text", "EOT positions")
        if model.text_pool_type == "argmax":
            return tokens.argmax(dim=-1)  # EOT has the largest id
        if model.text_pool_type == "eos":
            return (tokens == model.text_eos_id).int().argmax(dim=-1)
        raise ValueError(f"this text tower pools with {model.text_pool_type!r}, not at an EOT token")

    def _text_blocks(
        self,
        x: Tensor,
        attn_mask: Tensor | None,
        prompts: KVPrompts | None,
        deep: Sequence[Tensor | None] | None = None,
        lora: QKVDeltas | None = None,
    ) -> Tensor:
        """The text tower's blocks, then ln_final: (N, L, W) -> (N, L, W)."""
        model = self.model
        causal = attn_mask is not None and self._causal_text  # a slice of the causal mask is causal
        if prompts is None and deep is None and lora is None:
            return self._tower_call(_text_stack, model, x, attn_mask, self.attention, causal)
        for index, block in enumerate(model.transformer.resblocks):
            if deep is not None and 0 < index < len(deep) and deep[index] is not None:
                slots = deep[index].shape[0]
                if 1 + slots > x.shape[1]:
                    raise ValueError(f"{slots} text prompt slots do not fit in {x.shape[1]} columns")
                tokens = _per_row(deep[index], x).to(x.dtype)  # (N, P, W)
                x = torch.cat([x[:, :1], tokens, x[:, 1 + slots :]], dim=1)  # positions 1..P replaced
            kv = prompts.kv_tokens("text", index) if prompts is not None else None
            if kv is None:
                delta = lora.qkv_delta("text", index) if lora is not None else None
                x = _run_block(model.transformer, block, x, attn_mask, delta, self.attention, causal)  # (N, L, W)
            else:
                x = _run_prompted_block(model.transformer, block, x, kv, attn_mask=attn_mask)  # (N, L, W)
        return model.ln_final(x)

    def _tower_call(self, fn: Callable[..., Tensor], *args: Any) -> Tensor:
        """`fn(*args)`, through torch.compile when `compile_mode` asks; a compiler that cannot run fails in one line."""
        if self.compile_mode == "off":
            return fn(*args)
        device = args[1].device  # (the tower, then its input)
        _check_compiler(device, self.compile_mode)
        compiled = _compiled(fn, self.compile_mode)
        try:
            with torch._dynamo.config.patch(recompile_limit=COMPILE_RECOMPILE_LIMIT):
                return compiled(*args)
        except _COMPILE_FAILURES as err:  # not TorchRuntimeError: an input eager refuses too (a wrong shape)
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise ClipAdaptError(
                f"compile={self.compile_mode!r}: torch.compile of {fn.__name__} failed on {device} "
                f"({type(err).__name__}: {first}): use compile: off"
            ) from err

    def _project_text(self, pooled: Tensor, normalize: bool) -> Tensor:
        """(N, W) pooled text tokens -> (N, D) through the text projection."""
        projection = self.model.text_projection
        if isinstance(projection, nn.Linear):
            pooled = projection(pooled)  # (N, D)
        elif projection is not None:
            pooled = pooled @ projection  # (N, D)
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def _prompted_image_embeds(self, images: Tensor, deep: Sequence[Tensor | None]) -> Tensor:
        """VisionTransformer._embeds with deep[0]'s P tokens appended after the patches, before ln_pre."""
        if deep[0] is None:
            raise ValueError("image deep prompts need block 0's tokens: they set the P slots")
        visual = self.model.visual
        x = visual.conv1(images)  # (B, W, grid, grid)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, N, W)
        x = torch.cat([_expand_token(visual.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)  # (B, 1 + N, W)
        x = visual.patch_dropout(x + visual.positional_embedding.to(x.dtype))
        x = torch.cat([x, _per_row(deep[0], x).to(x.dtype)], dim=1)  # (B, 1 + N + P, W)
        return visual.ln_pre(x)

    def text_features(
        self,
        classnames: list[str],
        templates: list[str],
        chunk_size: int = 1000,
        prompts: KVPrompts | None = None,
        normalize_each: bool = True,
        lora: QKVDeltas | None = None,
    ) -> Tensor:
        """(C, D) unit class embeddings: per template encode + normalize, average, renormalize (CLIP ensemble).

        `normalize_each=False` averages the unnormalized features instead (PromptSRC's frozen teacher).
        """
        if not classnames or not templates:
            raise ValueError("text_features needs at least one class name and one template")
        device = self.logit_scale.device
        total = None
        for template in templates:
            tokens = self.tokenize([template.format(name) for name in classnames])  # (C, 77)
            features = torch.cat(
                [
                    self.encode_text(
                        chunk.to(device), normalize=normalize_each, prompts=prompts, lora=lora
                    )  # (chunk, D)
                    for chunk in tokens.split(chunk_size)
                ]
            )  # (C, D)
            total = features if total is None else total + features
        return F.normalize(total / len(templates), dim=-1)  # (C, D)

    def image_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters of the image tower, named as in `model` (`visual.…`)."""
        return self.model.visual.named_parameters(prefix="visual")

    def text_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Named parameters of the text tower (embeddings, blocks, ln_final, projection), named as in `model`."""
        for name, parameter in self.model.named_parameters():
            if name.split(".", 1)[0] in _TEXT_PARAMETER_ROOTS:  # `text.…` for a separate text tower
                yield name, parameter

    def qkv_weights(self, tower: str) -> list[tuple[str, nn.Parameter]]:
        """Per block of `tower`, its fused (3W, W) [q; k; v] input-projection weight, named as in `model`."""
        prefix = "visual.transformer" if tower == "image" else "transformer"
        return [
            (f"{prefix}.resblocks.{i}.attn.in_proj_weight", b.attn.in_proj_weight)
            for i, b in enumerate(self.blocks(tower))
        ]

    def blocks(self, tower: str) -> nn.ModuleList:
        """The residual blocks of `tower` ("image" or "text") of the layer loop, in order."""
        if tower in ("image", "text") and not {"image": self.image_native, "text": self.text_native}[tower]:
            raise self._no_seam(tower, f"the {tower} layer loop")
        if tower == "image":
            return self.model.visual.transformer.resblocks
        if tower == "text":
            return self.model.transformer.resblocks
        raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")

    def tower_blocks(self, tower: str) -> list[tuple[str, nn.Module]]:
        """Every residual block of `tower`, of any family, as (parameter-name prefix, module), in order.

        Native towers: `[visual.]transformer.resblocks.i.`; timm towers: `visual.trunk.blocks.i.` (or the
        blocks of each stage); ResNets: each bottleneck of `visual.layer1..4`; Hugging Face towers: their
        encoder layers. The blocks are the children of the outermost containers named like blocks.
        """
        if tower == "image":
            root, prefix = self.model.visual, "visual."
        elif tower == "text":
            text = getattr(self.model, "text", None)
            root, prefix = (text, "text.") if text is not None else (self.model.transformer, "transformer.")
        else:
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        found: list[tuple[str, nn.Module]] = []
        taken: list[str] = []
        for name, module in root.named_modules():
            if any(name.startswith(t) for t in taken):
                continue  # inside a block already found
            if isinstance(module, (nn.ModuleList, nn.Sequential)) and _BLOCK_CONTAINER.match(name.rsplit(".", 1)[-1]):
                children = list(module.named_children())
                if children:
                    found += [(f"{prefix}{name}.{child}.", block) for child, block in children]
                    taken.append(f"{name}.")
        if not found:
            raise ClipAdaptError(f"found no residual blocks in {self.tower_kind(tower)} of {self.arch}")
        return found

    def _pooled_length(self, tokens: Tensor) -> int | None:
        """Columns needed to reach every row's pooling position, or None if the tower cannot be truncated."""
        model = self.model
        # Without a causal mask every position sees every other, so nothing may be cut.
        if model.attn_mask is None or model.text_pool_type not in ("argmax", "eos"):
            return None
        return int(self.eot_positions(tokens).max()) + 1


def _per_row(tokens: Tensor, x: Tensor) -> Tensor:
    """(P, W) tokens shared by every row of a (N, L, W) batch -> an (N, P, W) view."""
    return tokens.unsqueeze(0).expand(x.shape[0], -1, -1)


def _image_tower(visual: nn.Module, images: Tensor, attention: str) -> Tensor:
    """The plain image path: (B, 3, H, W) -> (B, D) unnormalized, as VisionTransformer.forward (the unit `compile` compiles)."""
    x = visual._embeds(images)  # (B, 1 + N, W): class token + patch tokens
    for block in visual.transformer.resblocks:
        x = _run_block(visual.transformer, block, x, None, None, attention)  # (B, 1 + N, W)
    pooled, _ = visual._pool(x)  # (B, W)
    return pooled @ visual.proj if visual.proj is not None else pooled  # (B, D)


def _text_stack(model: nn.Module, x: Tensor, attn_mask: Tensor | None, attention: str, causal: bool) -> Tensor:
    """The plain text blocks, then ln_final: (N, L, W) -> (N, L, W) (the unit `compile` compiles)."""
    for block in model.transformer.resblocks:
        x = _run_block(model.transformer, block, x, attn_mask, None, attention, causal)  # (N, L, W)
    return model.ln_final(x)


_COMPILE_FAILURES = (
    torch._dynamo.exc.BackendCompilerFailed,  # inductor could not build the kernels (compiler, triton, ...)
    torch._dynamo.exc.Unsupported,  # a graph break in the tower (fullgraph=True): e.g. after an open_clip bump
    torch._dynamo.exc.InternalTorchDynamoError,
)
_COMPILED: dict[tuple[str, str], Callable[..., Tensor]] = {}  # (function, mode) -> its torch.compile
_COMPILERS_OK: set[str] = set()  # device types whose compiler was found


def _compiled(fn: Callable[..., Tensor], mode: str) -> Callable[..., Tensor]:
    """One torch.compile of a module-level tower function per mode, shared by every backbone (guards tell them apart)."""
    key = (fn.__name__, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, mode=mode, dynamic=None, fullgraph=True)
    return _COMPILED[key]


def _check_compiler(device: torch.device, mode: str) -> None:
    """Inductor needs a C++ compiler for CPU kernels and triton for CUDA ones: say so before torch's long trace."""
    if device.type in _COMPILERS_OK:
        return
    if device.type == "cpu":
        from torch._inductor import config as inductor_config

        names = [os.environ.get("CXX"), *inductor_config.cpp.cxx]
        if not any(name and shutil.which(name) for name in names):
            raise ClipAdaptError(
                f"compile={mode!r} on CPU needs a C++ compiler (inductor builds its kernels with one; looked for "
                f"{', '.join(n for n in names if n)} and $CXX): install g++ or use compile: off"
            )
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ClipAdaptError(
                f"compile={mode!r} on CUDA needs triton (inductor writes its GPU kernels in it): "
                "pip install triton (the version of your torch build) or use compile: off"
            )
    _COMPILERS_OK.add(device.type)


def _check_one_seam(prompts: KVPrompts | None, lora: QKVDeltas | None) -> None:
    if prompts is not None and lora is not None:
        raise ValueError("pass K/V prompts or q/k/v deltas to an encoder, not both: no block runs both seams")


def _run_block(
    transformer: nn.Module,
    block: nn.Module,
    x: Tensor,
    attn_mask: Tensor | None,
    delta: Callable[[Tensor], Tensor] | None = None,
    attention: str = "sdpa",
    causal: bool = False,
) -> Tensor:
    """One residual block (with a q/k/v delta if given), honouring open_clip's per-tower gradient-checkpointing flag.

    `causal`: `attn_mask` is the plain causal mask, so the explicit path passes `is_causal=True` instead of it.
    """
    checkpointed = transformer.grad_checkpointing and torch.is_grad_enabled()
    if delta is not None or attention == "sdpa":
        mask = None if causal else attn_mask
        if checkpointed:  # the default RNG-state preservation replays the delta's dropout masks
            return checkpoint(_low_rank_block, block, x, delta, mask, causal, use_reentrant=False)
        return _low_rank_block(block, x, delta, mask, causal)
    if checkpointed:
        return checkpoint(block, x, None, None, attn_mask, use_reentrant=False)
    return block(x, attn_mask=attn_mask)


def _low_rank_block(
    block: nn.Module,
    x: Tensor,
    delta: Callable[[Tensor], Tensor] | None,
    attn_mask: Tensor | None,
    causal: bool = False,
) -> Tensor:
    """ResidualAttentionBlock.forward with its attention written out, [q | k | v] = LN1(x)·W_inᵀ + b_in (+ delta(LN1(x))).

    nn.MultiheadAttention takes only its own in_proj_weight, so an input-dependent addition needs the
    attention spelled out (scaled dot-product, the same heads and out_proj); equal to the block up to
    float rounding without a delta. Batch-first throughout, straight into F.scaled_dot_product_attention
    (no mask, or `is_causal`, so that the flash / memory-efficient kernels apply; q, k, v are (B, H, L, W/H)
    views of the fused projection with unit last stride, which is what those kernels need); the four
    projections go through `_linear`. Also the `attention="sdpa"` path of a plain block.
    """
    attn = block.attn
    h = block.ln_1(x)  # (B, L, W)
    qkv = _linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3W)
    if delta is not None:
        qkv = qkv + delta(h)
    q, k, v = qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, W/H)
    mask = attn_mask.to(q.dtype) if attn_mask is not None else None  # additive (L, L), as the block passes it
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, W/H)
    out = _linear(out.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)  # (B, L, W)
    x = x + block.ls_1(out)
    return x + block.ls_2(_mlp(block.mlp, block.ln_2(x)))


def _mlp(mlp: nn.Module, h: Tensor) -> Tensor:
    """open_clip's block MLP (c_fc, act, c_proj) with both projections through `_linear`; any other MLP as itself."""
    fc, proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if not (isinstance(mlp, nn.Sequential) and len(mlp) == 3 and type(fc) is nn.Linear and type(proj) is nn.Linear):
        return mlp(h)
    act = mlp[1]
    if type(act) is nn.GELU and act.approximate == "none":
        hidden = _linear(h, fc.weight, fc.bias, gelu=True)  # (B, L, 4W)
    else:
        hidden = act(_linear(h, fc.weight, fc.bias))  # (B, L, 4W): QuickGELU, ...
    return _linear(hidden, proj.weight, proj.bias)  # (B, L, W)


def _is_causal(mask: Tensor | None) -> bool:
    """Whether an additive (L, L) mask is exactly the causal one (0 on and below the diagonal, -inf above)."""
    if mask is None or mask.ndim != 2 or mask.shape[0] != mask.shape[1] or not mask.is_floating_point():
        return False
    above = torch.ones_like(mask, dtype=torch.bool).triu(1)
    return bool((mask[above] == float("-inf")).all() and (mask[~above] == 0).all())


# oneDNN's fp32 GEMM (`mkldnn::_linear_pointwise`, Inductor's CPU linear) next to MKL's sgemm, which F.linear uses:
# on this project's AMD EPYC (AVX-512) it runs a ViT-B tower's projections about 2.2x faster (benchmarks/towers.py),
# IEEE fp32 either way (equal up to summation order). x86 only, where it was measured; elsewhere F.linear.
_ONEDNN = (
    platform.machine() in ("x86_64", "AMD64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
# Below about 2^20 multiply-adds per GEMM oneDNN's call overhead (~15 us) outweighs its speed (MKL wins on tiny towers).
_ONEDNN_MIN_MACS = 2**20


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, gelu: bool = False) -> Tensor:
    """F.linear(x, weight, bias) (then exact GELU if `gelu`), through oneDNN for fp32 on an x86 CPU.

    Under autocast, and inside torch.func transforms (vmap, grad), F.linear runs: neither knows the oneDNN
    op. Without gradients the GELU is oneDNN's post-op of the same GEMM (one pass less over the activations).
    """
    if not (
        _ONEDNN
        and torch.backends.mkldnn.enabled
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and x.numel() * weight.shape[0] >= _ONEDNN_MIN_MACS  # rows x in x out
        and not torch.compiler.is_compiling()  # inductor picks its own GEMMs (its oneDNN lowering wants frozen weights)
        and not (_functorch_wrapped(x) or _functorch_wrapped(weight))
    ):
        y = F.linear(x, weight, bias)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        y = _OneDNNLinear.apply(x, weight, bias)
    elif gelu:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    else:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.gelu(y) if gelu else y


def _functorch_wrapped(t: Tensor) -> bool:
    """Whether `t` is a torch.func (vmap / grad) wrapper, which the oneDNN op and `_OneDNNLinear` cannot take."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class _OneDNNLinear(torch.autograd.Function):
    """y = x·Wᵀ + b with oneDNN's GEMM forward and backward (the op itself has no autograd formula)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        flat = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dnn = torch.ops.mkldnn._linear_pointwise
        grad_x = dnn(grad, weight.t(), None, "none", [], "") if ctx.needs_input_grad[0] else None  # (..., in)
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = dnn(flat.t(), x.reshape(-1, x.shape[-1]).t(), None, "none", [], "")  # (out, in)
        grad_b = flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _run_prompted_block(
    transformer: nn.Module, block: nn.Module, x: Tensor, prompts: Tensor, attn_mask: Tensor | None
) -> Tensor:
    """`_run_block` with P extra key/value tokens; checkpointed like the plain block when the tower asks."""
    if transformer.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(_prompted_block, block, x, prompts, attn_mask, use_reentrant=False)
    return _prompted_block(block, x, prompts, attn_mask)


def _prompted_block(block: nn.Module, x: Tensor, prompts: Tensor, attn_mask: Tensor | None) -> Tensor:
    """ResidualAttentionBlock.forward with keys/values from LN1([P ; x]) and queries from LN1(x) only.

    The output keeps the input length (prompts are not propagated). With a causal `attn_mask` (text)
    the mask becomes [zeros(L, P) | causal(L, L)]: every query sees every prompt and no later real
    token, so causality and the EOT truncation stay exact. For K/V the token order is irrelevant, so
    the prompts are simply put first in both towers.
    """
    q = block.ln_1(x)  # (B, L, W)
    p = block.ln_1(prompts.to(x.dtype))  # (P, W): LN is per token, so the batch can share it
    kv = torch.cat([p.unsqueeze(0).expand(x.shape[0], -1, -1), q], dim=1)  # (B, P + L, W)
    if attn_mask is not None:
        attn_mask = attn_mask.to(q.dtype)
        attn_mask = torch.cat([attn_mask.new_zeros(attn_mask.shape[0], p.shape[0]), attn_mask], dim=1)  # (L, P + L)
    out = block.attn(q, kv, kv, need_weights=False, attn_mask=attn_mask)[0]  # (B, L, W)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def check_weights(
    arch: str, pretrained: str | None, cache_dir: str | None = None, model_config: str | None = None
) -> None:
    """Fail now, with the fix in the message, if `arch` or its weights cannot be had (downloads if needed)."""
    _resolve(arch, pretrained, model_config, cache_dir)


@dataclass(frozen=True)
class _Resolved:
    """What open_clip is given for one model: its name, its config and the create_model arguments."""

    arch: str  # the user's name: an open_clip name, `hf-hub:org/repo`, `local-dir:PATH`, a model_config's stem
    name: str  # what open_clip.create_model / get_tokenizer are given (`local-dir:` of the Hub cache for hf-hub)
    cfg: dict[str, Any]
    kwargs: dict[str, Any]  # `pretrained` (a local file), force_quick_gelu, force_preprocess_cfg


def _resolve(arch: str, pretrained: str | None, model_config: str | None, cache_dir: str | None) -> _Resolved:
    """The one name resolver: an open_clip name + tag/file, a model config file of one's own, hf-hub:, local-dir:."""
    if model_config:
        arch = _register_config(model_config)
    schema, identifier = open_clip.factory.parse_model_name(arch)
    if schema is None:
        cfg = _model_config(arch)
        kwargs = _pretrained_kwargs(arch, pretrained, cfg, cache_dir) if pretrained else {}
        return _Resolved(arch, arch, cfg, kwargs)
    if pretrained:
        log.info("%s names its own weights: pretrained=%r is ignored (as open_clip does)", arch, pretrained)
    folder = _hub_folder(identifier, cache_dir) if schema == "hf-hub" else os.path.expanduser(identifier)
    cfg = _folder_config(folder, arch)
    weights = open_clip.factory._find_checkpoint_in_dir(Path(folder))
    if weights is not None:
        read_weights(weights)  # safe and cheap (mmap): a file that is not weights ends here in one line
    else:
        log.warning("%s has no weights file: the model is randomly initialised", arch)
    return _Resolved(arch, f"local-dir:{folder}", cfg, {})


def _register_config(path: str) -> str:
    """Register a user's open_clip model config JSON under its file stem (open_clip.add_model_config); the stem."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ClipAdaptError(f"model_config {file} does not exist: pass an open_clip model config JSON file")
    try:
        cfg = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ClipAdaptError(f"model_config {file} is not JSON ({err}): pass an open_clip model config") from None
    missing = [key for key in ("embed_dim", "vision_cfg", "text_cfg") if key not in cfg]
    if missing:
        raise ClipAdaptError(
            f"model_config {file} has no {', '.join(missing)}: an open_clip model config has embed_dim, vision_cfg "
            "and text_cfg (see open_clip/model_configs/*.json)"
        )
    name = file.stem
    known = open_clip.get_model_config(name)
    if known is not None and known != cfg:
        raise ClipAdaptError(
            f"model_config {file} is named {name!r}, which open_clip already knows with another config: rename the file"
        )
    if known is None:
        open_clip.add_model_config(file)
    return name


def _folder_config(folder: str, arch: str) -> dict[str, Any]:
    """The model config in `folder`/open_clip_config.json (open_clip's layout for hf-hub: and local-dir:)."""
    file = Path(folder) / "open_clip_config.json"
    if not file.is_file():
        raise ClipAdaptError(
            f"{arch}: no open_clip_config.json in {folder}: point local-dir: at an open_clip model folder"
        )
    try:
        cfg = json.loads(file.read_text())["model_cfg"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ClipAdaptError(f"{arch}: {file} has no model_cfg ({type(err).__name__}: {err})") from None
    _check_family(cfg, arch, named=False)
    return cfg


def _hub_folder(repo_id: str, cache_dir: str | None) -> str:
    """The Hub cache folder holding `repo_id`'s config and weights, downloading them only when the Hub answers."""
    names = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    config = huggingface_hub.try_to_load_from_cache(repo_id, "open_clip_config.json", cache_dir=cache_dir)
    cached = [huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir) for name in names]
    if isinstance(config, str) and any(isinstance(c, str) for c in cached):
        return os.path.dirname(config)
    hf_cache = str(cache_dir or hf_constants.HF_HUB_CACHE)

    def unavailable(reason: str) -> PretrainedWeightsUnavailableError:
        return PretrainedWeightsUnavailableError(
            f"hf-hub:{repo_id} (open_clip_config.json and {' or '.join(names)}) is not in the Hugging Face cache "
            f"{hf_cache} and could not be downloaded ({reason}). Download it once on a machine with internet access "
            f"(`huggingface-cli download {repo_id}`) and copy the cache folder here (or point cache_dir / "
            "HF_HUB_CACHE at it), or pass `local-dir:PATH` of a folder with both files."
        )

    if huggingface_hub.is_offline_mode():
        raise unavailable("HF_HUB_OFFLINE is set")
    _probe_hub(repo_id, "open_clip_config.json", unavailable)
    try:
        config = huggingface_hub.hf_hub_download(repo_id, "open_clip_config.json", cache_dir=cache_dir)
        for name in names:
            try:
                huggingface_hub.hf_hub_download(repo_id, name, cache_dir=cache_dir)
                break
            except EntryNotFoundError:
                continue
    except Exception as error:  # noqa: BLE001 - repository, revision and network errors differ by version
        raise unavailable(f"download failed: {type(error).__name__}: {error}") from error
    return os.path.dirname(config)


def _probe_hub(repo_id: str, filename: str, unavailable: Callable[[str], Exception]) -> None:
    """One short HEAD request: open_clip's own download retries unreachable hosts for ~50 s."""
    try:
        huggingface_hub.get_hf_file_metadata(huggingface_hub.hf_hub_url(repo_id, filename), timeout=PROBE_TIMEOUT_S)
    except HfHubHTTPError:
        pass  # the Hub answered (e.g. 404 for one file name): it is reachable
    except Exception as error:  # noqa: BLE001 - connection, DNS, proxy and timeout errors differ by HTTP backend
        raise unavailable(f"Hugging Face Hub unreachable: {type(error).__name__}: {error}") from error


def _model_config(arch: str) -> dict[str, Any]:
    """The open_clip config of a registered name, checked to be a family clipadapt runs."""
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(
            f"Unknown open_clip architecture {arch!r}.{hint} "
            "See all names with `python -c 'import open_clip; print(open_clip.list_models())'`, or pass "
            "hf-hub:org/repo, local-dir:PATH, or your own config as model_config."
        )
    _check_family(cfg, arch)
    return cfg


def _check_family(cfg: dict[str, Any], arch: str, named: bool = True) -> None:
    """Refuse what clipadapt does not run (CoCa), and a Hugging Face tower without its package, in one line.

    `named`: `arch` is an open_clip name, whose "siglip" makes open_clip pick its SigLIP tokenizer (transformers).
    """
    if "multimodal_cfg" in cfg:
        raise ClipAdaptError(f"{arch} is a CoCa captioning model: clipadapt runs contrastive CLIP / SigLIP models")
    text = cfg.get("text_cfg", {})
    if text.get("hf_model_name") or text.get("hf_tokenizer_name") or (named and "siglip" in arch.lower()):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ClipAdaptError(
                f"{arch} has a Hugging Face text tower or tokenizer: install transformers (pip install transformers)"
            ) from None


# Weights shipped inside the package (no download): (arch, tag) -> file next to this module.
BUNDLED_TAGS = {("clipadapt-toy", "toy"): Path(__file__).parent / "pretrained" / "clipadapt-toy.safetensors"}


def _tag_cfg(arch: str, pretrained: str) -> dict[str, Any]:
    """open_clip's pretrained config of a tag, or a bundled tag's file; {} when `pretrained` is no tag of `arch`."""
    bundled = BUNDLED_TAGS.get((arch, pretrained))
    if bundled is not None:
        if not bundled.is_file():
            raise ClipAdaptError(
                f"the bundled weights {bundled} of {arch!r} / {pretrained!r} are missing: reinstall clipadapt"
            )
        return {"file": str(bundled)}
    return open_clip.get_pretrained_cfg(arch, pretrained)


def _pretrained_kwargs(arch: str, pretrained: str, model_cfg: dict[str, Any], cache_dir: str | None) -> dict[str, Any]:
    """open_clip.create_model arguments that load `pretrained` (a tag, a bundled tag or a file) from local disk."""
    tag_cfg = _tag_cfg(arch, pretrained)
    if tag_cfg:
        path, torchscript = _resolve_tag(arch, pretrained, tag_cfg, cache_dir)
        quick_gelu = tag_cfg.get("quick_gelu", False)
        # The tag's preprocessing (mean/std/interpolation) would be lost when loading by path.
        preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    else:
        if not _looks_like_path(pretrained):
            tags = open_clip.list_pretrained_tags_by_model(arch) + [t for a, t in BUNDLED_TAGS if a == arch]
            raise ValueError(
                f"Unknown pretrained tag {pretrained!r} for {arch!r}. Known tags: {tags or 'none'}; "
                "or pass a local checkpoint file path, or null for random init."
            )
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Pretrained checkpoint file not found: {path}")
        torchscript = is_torchscript(path)
        if not torchscript:  # (an archive is read in full, as data, when the model is built)
            read_weights(path)  # safe and cheap (mmap): a file that is not weights ends here in one line
        quick_gelu = torchscript  # a TorchScript archive is an original OpenAI checkpoint
        preprocess = {}
    kwargs: dict[str, Any] = {"pretrained": path}  # open_clip reads a state dict with weights_only=True
    if quick_gelu and not model_cfg.get("quick_gelu", False):
        log.info("%s weights were trained with QuickGELU: building %s with force_quick_gelu=True", pretrained, arch)
        kwargs["force_quick_gelu"] = True
    if preprocess:
        kwargs["force_preprocess_cfg"] = preprocess
    return kwargs


def _looks_like_path(value: str) -> bool:
    """Tags are bare identifiers; anything with a separator, `~` or a file suffix is meant as a path."""
    return "/" in value or os.sep in value or value.startswith("~") or bool(Path(value).suffix)


def _load_archive(model: nn.Module, path: str, arch: str) -> None:
    """Load the weights of a TorchScript archive (OpenAI's `clip` download), read as data, into `model`."""
    tensors = read_torchscript(path)
    expected = model.state_dict()
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise ClipAdaptError(
            f"pretrained {path} is a TorchScript archive without the weights of {arch!r} (no {missing[0]}, "
            f"{len(missing)} missing): pass OpenAI's archive of this architecture or an open_clip state dict"
        )
    # Only the model's own entries: an archive also keeps attributes (OpenAI's input_resolution, ...) as tensors.
    model.load_state_dict({name: tensors[name] for name in expected})


def _hf_candidates(hf_hub: str) -> tuple[str, list[str]]:
    """Hub repo id and the file names open_clip tries for it, safetensors first."""
    repo_id, filename = os.path.split(hf_hub)
    filename = filename or _HF_DEFAULT_FILENAME
    names = []
    if filename == _HF_DEFAULT_FILENAME:
        names.append("open_clip_model.safetensors")
    elif filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return repo_id, [*names, filename]


def _resolve_tag(arch: str, tag: str, tag_cfg: dict[str, Any], cache_dir: str | None) -> tuple[str, bool]:
    """Local file for an open_clip tag, downloading it only when the Hub answers; (path, is TorchScript)."""
    hf_cache = str(cache_dir or hf_constants.HF_HUB_CACHE)
    url_cache = os.path.expanduser(cache_dir or "~/.cache/clip")  # open_clip's directory for URL downloads
    looked_in = []

    if "file" in tag_cfg:
        return tag_cfg["file"], False
    repo_id, names = _hf_candidates(tag_cfg["hf_hub"]) if tag_cfg.get("hf_hub") else ("", [])
    for name in names:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
        if isinstance(cached, str):
            return cached, False
    if repo_id:
        looked_in.append(f"Hugging Face cache {hf_cache} (repo {repo_id}, files {' or '.join(names)})")
    if tag_cfg.get("url"):
        path = os.path.join(url_cache, os.path.basename(tag_cfg["url"]))
        if _url_file_ok(path, tag_cfg["url"]):
            return path, is_torchscript(path)
        looked_in.append(f"URL cache {path}")

    def unavailable(reason: str) -> PretrainedWeightsUnavailableError:
        return PretrainedWeightsUnavailableError(
            f"Pretrained weights for arch={arch!r}, pretrained={tag!r} are not on this machine and could not "
            f"be downloaded ({reason}). Looked in: {'; '.join(looked_in)}.\n"
            "To provide them, either\n"
            f'  - download them once on a machine with internet access, e.g. `python -c "from clipadapt.models '
            f"import CLIPBackbone; CLIPBackbone('{arch}', '{tag}')\"`, and copy the cache folder {hf_cache} to "
            "the same place here (or point `cache_dir` / HF_HUB_CACHE at it), or\n"
            "  - pass a local checkpoint file as `pretrained` (a state_dict .pt/.bin/.safetensors, or OpenAI's "
            "TorchScript ViT-B-16.pt from ~/.cache/clip)."
        )

    if not repo_id:
        raise unavailable("the tag has no Hugging Face Hub source")
    if huggingface_hub.is_offline_mode():
        raise unavailable("HF_HUB_OFFLINE is set")
    _probe_hub(repo_id, names[0], unavailable)  # then let open_clip pick the file
    try:
        return open_clip.download_pretrained(tag_cfg, cache_dir=cache_dir), False
    except Exception as error:  # noqa: BLE001 - open_clip wraps every download failure differently
        raise unavailable(f"download failed: {type(error).__name__}: {error}") from error


def _url_file_ok(path: str, url: str) -> bool:
    """Whether a URL-cache file exists and matches the checksum open_clip encodes in the URL."""
    if not os.path.isfile(path):
        return False
    if "openaipublic" in url:
        expected = url.split("/")[-2]
    elif "mlfoundations" in url:
        expected = os.path.splitext(os.path.basename(url))[0].split("-")[-1]
    else:
        return True
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest().startswith(expected)
