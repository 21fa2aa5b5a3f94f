"""Learned text context (CoOp family) and deep vision-language prompts (MaPLe, PromptSRC/IVLP).

Text context (CoOp: Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv 2109.01134): the class prompt is t_c = [SOT] [V]_1 ... [V]_M [CLASS_c] [.] [EOT] with M learned
vectors in the token-embedding space. `place_context` puts them between SOT and the class-name
tokens ("end", CoOp's default), split around the name ("middle": ⌊M/2⌋ before, the rest after) or
after it ("front"); the EOT moves by M, so each row's pooling position is returned with the
embeddings, and the sequence is built only up to the last EOT (`CLIPBackbone.encode_text_embeddings`
truncates there anyway: causal). A context is shared (M, W), class-specific (C, M, W), or batched
per image (B, 1, M, W) for CoCoOp; the prompts of every class are built in one gather.

Deep prompts (`VLPrompts`): P tokens per block j < J of each tower, *replaced* layer by layer (see
`CLIPBackbone`). Text block 0's are the context above; image block 0's are inserted before ln_pre.
MaPLe (Khattak et al., CVPR 2023, arXiv 2210.03117) couples them, P̃_j = F_j(P_j) with one linear
F_j: W_text -> W_image per block; IVLP / PromptSRC learns both towers' tokens independently.

Decisions: M counts BPE tokens of `context_init` (CoOp counts words: the same for "a photo of a");
with fewer context tokens than the init has, its first M are used (MaPLe: "a photo" for M = 2); a
class-specific context starts from the init repeated per class (CoOp ignores CSC when it has an init).
"""

import logging
from typing import NamedTuple

import torch
from torch import Tensor, nn

from clipadapt.errors import ClipAdaptError
from clipadapt.models.backbone import CLIPBackbone

POSITIONS = ("end", "middle", "front")

log = logging.getLogger(__name__)


class ClassTokens(NamedTuple):
    """Tokenized `"{name}."` prompts of a class list, without context."""

    ids: Tensor  # (C, 77) SOT name . EOT pad
    eot: Tensor  # (C,) EOT position
    name_lengths: Tensor  # (C,) BPE tokens of the name alone


def class_tokens(clip: CLIPBackbone, classnames: list[str]) -> ClassTokens:
    """Token ids, EOT positions and name lengths of `"{name}."` for every class (CPU tensors)."""
    ids = clip.tokenize([f"{name}." for name in classnames])  # (C, 77)
    eot = clip.eot_positions(ids)  # (C,)
    # A name ending in punctuation may merge with "." into one token: never count past the EOT.
    name_lengths = torch.minimum(clip.eot_positions(clip.tokenize(list(classnames))) - 1, eot - 1)
    return ClassTokens(ids, eot, name_lengths)


def place_context(
    tokens: Tensor,
    eot: Tensor,
    name_lengths: Tensor,
    context: Tensor,
    position: str = "end",
    context_length: int = 77,
) -> tuple[Tensor, Tensor]:
    """Insert M context vectors after SOT: (C, L0, W) token embeddings + context -> (..., C, L, W), (C,) EOT.

    `tokens` needs the columns up to max(eot); `context` is (M, W) shared, (C, M, W) per class or
    (B, 1 | C, M, W) per image; L = max(eot) + M + 1, at most the tower's `context_length`.
    """
    if position not in POSITIONS:
        raise ValueError(f"class token position must be one of {', '.join(POSITIONS)}, got {position!r}")
    classes, columns, width = tokens.shape
    slots = context.shape[-2]  # M
    length = int(eot.max()) + slots + 1
    if length > context_length:
        raise ClipAdaptError(
            f"a class name is too long for {slots} context tokens: its prompt needs {length} of the "
            f"{context_length} text positions; shorten the class name or use fewer context tokens (n_ctx)"
        )
    device = tokens.device
    p = torch.arange(length, device=device).expand(classes, -1)  # (C, L) output positions
    k = name_lengths.to(device).unsqueeze(1)  # (C, 1)
    half = slots // 2 if position == "middle" else slots
    # Two runs of context slots per row: [first, first + half) and [second, second + slots - half).
    first = 1 + k if position == "front" else torch.ones_like(k)
    second = 1 + half + k
    in_first = (p >= first) & (p < first + half)
    in_second = (p >= second) & (p < second + slots - half)
    slot = torch.where(in_first, p - first, half + p - second).clamp(0, slots - 1)  # (C, L) context index
    before = (p - first).clamp(0, half) + (p - second).clamp(0, slots - half)  # context slots left of p
    source = (p - before).clamp(0, columns - 1)  # (C, L) token column
    words = tokens.gather(1, source.unsqueeze(-1).expand(-1, -1, width))  # (C, L, W)
    if context.dim() == 2:
        context = context.unsqueeze(0)  # (1, M, W)
    batch = context.shape[:-3]
    context = context.expand(*batch, classes, slots, width)  # (..., C, M, W)
    learned = context.gather(-2, slot.expand(*batch, -1, -1).unsqueeze(-1).expand(*batch, -1, -1, width))
    prompts = torch.where((in_first | in_second).unsqueeze(-1), learned, words.to(learned.dtype))  # (..., C, L, W)
    return prompts, eot + slots  # on the device `eot` came on: the CPU, so the length needs no sync


def init_context(
    clip: CLIPBackbone, length: int, init: str | None = None, classes: int | None = None, std: float = 0.02
) -> Tensor:
    """(M, W) or, with `classes`, (C, M, W) context: the first M token embeddings of `init`, or N(0, std²)."""
    if length < 1:
        raise ValueError(f"the context needs at least one token, got n_ctx={length}")
    width = clip.width_text
    if init:
        ids = clip.tokenize([init])  # (1, 77)
        available = int(clip.eot_positions(ids)[0]) - 1
        if length > available:
            raise ValueError(
                f"context_init {init!r} has {available} tokens, fewer than n_ctx={length}: "
                f"use n_ctx <= {available} or context_init null (random N(0, {std}²) init)"
            )
        with torch.no_grad():
            vectors = clip.token_embeddings(ids)[0, 1 : 1 + length].float().cpu().clone()  # (M, W)
        return vectors if classes is None else vectors.expand(classes, -1, -1).clone()
    shape = (length, width) if classes is None else (classes, length, width)
    return torch.randn(shape) * std


class TextContext(nn.Module):
    """M learned context vectors placed after SOT in every class prompt (CoOp); class tokens cached."""

    def __init__(self, vectors: Tensor, position: str = "end") -> None:
        """`vectors`: (M, W) shared or (C, M, W) class-specific initial context."""
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"class token position must be one of {', '.join(POSITIONS)}, got {position!r}")
        self.vectors = nn.Parameter(vectors)
        self.position = position
        self._tokens: dict[tuple[str, ...], ClassTokens] = {}  # tokenized once per class list

    def tokens(self, clip: CLIPBackbone, classnames: list[str]) -> ClassTokens:
        """The (cached) class tokens of `classnames`."""
        key = tuple(classnames)
        if key not in self._tokens:
            self._tokens[key] = class_tokens(clip, classnames)
        return self._tokens[key]

    def features(
        self,
        clip: CLIPBackbone,
        classnames: list[str],
        context: Tensor | None = None,
        deep: list[Tensor | None] | None = None,
        chunk_size: int = 1000,
    ) -> Tensor:
        """(C, D) unit text features with the context; a batched (B, 1, M, W) `context` gives (B, C, D).

        `context` defaults to the learned vectors; a class-specific (C, M, W) one has a row per class.
        The B x C prompts are encoded `chunk_size` rows at a time, each chunk truncated at its last EOT.
        """
        context = self.vectors if context is None else context
        if context.dim() == 3 and len(context) != len(classnames):
            raise ValueError(f"a class-specific context has {len(context)} rows for {len(classnames)} classes")
        cls = self.tokens(clip, classnames)
        columns = int(cls.eot.max()) + 1
        words = clip.token_embeddings(cls.ids[:, :columns])  # (C, L0, W), frozen
        if context.dim() < 4:
            out = []
            for rows in torch.arange(len(classnames)).split(chunk_size):
                ctx = context if context.dim() == 2 else context[rows]
                prompts, eot = place_context(
                    words[rows], cls.eot[rows], cls.name_lengths[rows], ctx, self.position, clip.context_length
                )
                out.append(clip.encode_text_embeddings(prompts, eot, deep=deep))  # (chunk, D)
            return torch.cat(out)  # (C, D)
        images = max(1, chunk_size // len(classnames))  # images per chunk: rows = images x C
        out = []
        for ctx in context.split(images):  # (b, 1, M, W)
            prompts, eot = place_context(words, cls.eot, cls.name_lengths, ctx, self.position, clip.context_length)
            flat = clip.encode_text_embeddings(prompts.flatten(0, 1), eot.repeat(len(ctx)), deep=deep)
            out.append(flat.view(len(ctx), len(classnames), -1))  # (b, C, D)
        return torch.cat(out)  # (B, C, D)


class VLPrompts(nn.Module):
    """Deep prompts in the first J blocks of both towers: MaPLe (coupled) or IVLP / PromptSRC (independent)."""

    def __init__(
        self,
        context: TextContext,
        text_depth: int,
        image_depth: int,
        image_width: int,
        image_length: int | None = None,
        coupled: bool = False,
        std: float = 0.02,
    ) -> None:
        """
        Args:
            context: the text context: block 0's text prompts (M, W_text), shared across classes.
            text_depth: J_text, text blocks with prompts (block 0 is the context).
            image_depth: J_image, image blocks with prompts.
            image_width: W_image.
            image_length: P image tokens per block (independent prompts); coupled prompts have M.
            coupled: MaPLe: image tokens are F_j(text tokens) with a linear coupler per block.
            std: N(0, std²) init of every deeper text token and of the independent image tokens.
        """
        super().__init__()
        if context.vectors.dim() != 2:
            raise ValueError("deep prompts need a shared (M, W) context, not a class-specific one")
        if text_depth < 1 or image_depth < 1:
            raise ValueError(f"prompt depths must be >= 1, got text {text_depth}, image {image_depth}")
        if coupled and text_depth != image_depth:
            raise ValueError(f"coupled prompts need equal depths, got text {text_depth}, image {image_depth}")
        self.context = context
        self.coupled = coupled
        slots, width = context.vectors.shape
        self.text = nn.ParameterList(nn.Parameter(torch.randn(slots, width) * std) for _ in range(text_depth - 1))
        if coupled:
            self.couplers = nn.ModuleList(nn.Linear(width, image_width) for _ in range(image_depth))  # F_j
        else:
            length = image_length or slots
            self.image = nn.ParameterList(
                nn.Parameter(torch.randn(length, image_width) * std) for _ in range(image_depth)
            )

    def text_tokens(self) -> list[Tensor | None]:
        """Per text block j < J: None for block 0 (the context), then the (M, W_text) replacement tokens."""
        return [None, *self.text]

    def image_tokens(self) -> list[Tensor]:
        """Per image block j < J: the (P, W_image) tokens (MaPLe: F_0(context), then F_j(text token j))."""
        if not self.coupled:
            return list(self.image)
        sources = [self.context.vectors, *self.text]
        return [coupler(source) for coupler, source in zip(self.couplers, sources, strict=True)]


def fit_depth(clip: CLIPBackbone, depth: int, tower: str) -> int:
    """`depth` (J) capped at the tower's blocks, so a ViT-B/16 config also runs on the 2-block test model."""
    blocks = len(clip.blocks(tower))
    if depth > blocks:
        log.warning("prompt depth %d > %d %s blocks of this model: prompting all %d", depth, blocks, tower, blocks)
    return min(depth, blocks)
