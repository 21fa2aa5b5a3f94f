"""CLIP-AST: adaptive selective tuning of CLIP's own weights, no new parameters.

Paper: Zhang, Deng, Guo, Hu, "Adaptive Parameter Selection for Tuning Vision-Language Models",
CVPR 2025. Spec: shared/specs/ast.md.

Stage `probe` (`probe_epochs`): every tensor of every residual block of both towers trains with CE
under AdamW. At the boundary each sub-layer tensor i is scored from the optimizer (Eq. 8,
`clipadapt.selection`): v'_i = mean(1 / (sqrt(v̂_i) + eps)), and the top-K per block are kept.
Stage `selective`: back to the pretrained weights, only the selected tensors train (Eq. 11):

    L = CE(s·f̂ŵᵀ, y) + λ1·mean|f̂ − f̂₀| + λ2·mean|ŵ − ŵ₀| + λ3·KL(p₀ ‖ p)/(B·C)

with f̂₀ from a frozen copy of the pretrained image tower on the same augmented batch and ŵ₀ the
PromptSRC teacher text: the mean of the *unnormalized* features over its 60 templates, normalized
once. The tuned model is a plain CLIP (`clipadapt export`).

Decisions the paper leaves open (spec "Decision"s, each an option): bias-corrected scores
(`importance`), tensor units with optional q/k/v rows (`split_qkv`), restart from the pretrained
weights (`restart_from_pretrained`), λ = 10 / 25 / 1 (PromptSRC), student prompt "a photo of a {}.".
Controls: `scheme` bitfit | random (no probe), `granularity` global, `encoders` image | text.

Epochs (paper §4.1: 1 probe epoch, then 30 epochs, 20 for base-to-novel): `trainer.max_epochs` counts
the selective epochs for every scheme and the probe's `probe_epochs` are added on top, so the shipped
configs (max_epochs 30 / 20) train 1 + 30 (1 + 20) epochs with the adaptive scheme and 30 (20) with the
random and BitFit controls, and a `--trainer.max_epochs N` flag means N selective epochs for all of them.
The warmup + cosine of the selective stage spans exactly its max_epochs epochs. `selection_seed` of
the random scheme defaults to the run's seed (`data.seed` under the CLI); an explicit value wins.

Other backbones (an extension; the paper tunes ViT CLIPs): a unit is a parameter tensor of each residual
block of whatever tower it is (a timm block, a ResNet bottleneck, a CustomTextCLIP or Hugging Face text
layer; `CLIPBackbone.tower_blocks`); a native CLIP's units and selection are unchanged.

State: the selection and the teacher text features are method state (checkpoints), so a resumed
stage-2 run keeps its selection and skips the probe. The frozen image tower is *not* in the state
dict: it equals the pretrained weights and is rebuilt at construction (saves ~350 MB per ViT-B
checkpoint). Split q/k/v rows that are not selected get a zero gradient and are restored after each
optimizer step, because AdamW's weight decay would otherwise still move them.
"""

import copy
import math
import weakref
from collections.abc import Iterable
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn

from clipadapt.data.templates import PROMPTSRC_TEMPLATES
from clipadapt.errors import ClipAdaptError
from clipadapt.losses import consistency_kl, consistency_l1
from clipadapt.methods.base import AdaptationModule, Stage, run_seed
from clipadapt.selection import (
    block_units,
    filter_encoders,
    importance_scores,
    row_masks,
    select_units,
    selection_grid,
)

TEACHER = "teacher_visual"


class CLIPAST(AdaptationModule):
    """Probe all block tensors, keep the top-K per block by AdamW effective step, tune only those."""

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        scheme: str = "adaptive",
        granularity: str = "layer",
        top_k: int = 6,
        encoders: str = "both",
        importance: str = "corrected",
        split_qkv: bool = False,
        probe_epochs: int = 1,
        probe_lr: float = 1e-5,
        restart_from_pretrained: bool = True,
        image_consistency_weight: float = 10.0,
        text_consistency_weight: float = 25.0,
        logit_consistency_weight: float = 1.0,
        selection_seed: int | None = None,
        prompts: str = "simple",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            scheme: adaptive (probe + scores) | bitfit (every bias) | random (top_k random tensors per block).
            granularity: layer (top-K per block) | global (top-K sub-layer types per encoder, in every block).
            top_k: K, sub-layers kept per block (or types, for global).
            encoders: both | image | text: the towers whose blocks may be selected.
            importance: corrected (1/(sqrt(v̂)+eps), Eq. 6-8) | raw (1/sqrt(v+eps), the unofficial code).
            split_qkv: q, k and v rows of attn.in_proj_{weight,bias} are separate units (16 per block).
            probe_epochs: length of the probe stage.
            probe_lr: learning rate of the probe (stage 2 uses the optimizer's).
            restart_from_pretrained: stage 2 starts from the pretrained weights, not the probe's.
            image_consistency_weight: λ1, Eq. 11 (L1 to the frozen image features).
            text_consistency_weight: λ2, Eq. 11 (L1 to the 60-template teacher text features).
            logit_consistency_weight: λ3, Eq. 11 (KL from the frozen model's class distribution).
            selection_seed: seed of the random scheme; None: the run's seed (`data.seed` under the CLI).
            prompts: the student's text prompts (default "a photo of a {}."; `dataset` for CoOp's).
            **kwargs: the AdaptationModule options (arch, pretrained, optimizer, warmup, ...).
        """
        super().__init__(classnames, templates, prompts=prompts, **kwargs)
        if scheme not in ("adaptive", "bitfit", "random"):
            raise ValueError(f"scheme must be adaptive | bitfit | random, got {scheme!r}")
        if granularity not in ("layer", "global") or importance not in ("corrected", "raw"):
            raise ValueError(
                f"granularity must be layer | global and importance corrected | raw, got {granularity!r}, {importance!r}"
            )
        if scheme == "adaptive" and probe_epochs < 1:
            raise ValueError("the adaptive scheme needs probe_epochs >= 1")
        # The random control follows the run's seed: a fixed draw for every seed would understate the spread.
        self.selection_seed = run_seed() if selection_seed is None else selection_seed
        self._lengthened: weakref.ref | None = None  # the fit loop whose max_epochs already counts the probe
        model = self.clip.model
        # A native CLIP's blocks are found by name; any other tower's through the backbone (timm, ResNet, HF blocks).
        blocks = None if self.clip.native else {t: [p for p, _ in self.clip.tower_blocks(t)] for t in ("image", "text")}
        self.units = block_units(((n, p.shape) for n, p in model.named_parameters()), split_qkv, blocks)
        self.candidates = filter_encoders(self.units, encoders)
        self.selection: dict[str, Any] | None = None if scheme == "adaptive" else self._make_selection(None)
        # The probe moves the block tensors; a CPU copy of their pretrained values restores them.
        restore = scheme == "adaptive" and restart_from_pretrained
        params = dict(model.named_parameters())
        self._pretrained = {n: params[n].detach().cpu().clone() for n in self._unit_params()} if restore else None
        self.teacher_visual: nn.Module | None = None
        if image_consistency_weight or logit_consistency_weight:
            self.teacher_visual = copy.deepcopy(model.visual).requires_grad_(False).eval()
            self.register_state_dict_post_hook(_drop_teacher)
            self.register_load_state_dict_post_hook(_ignore_missing_teacher)
        self._teacher_text: Tensor | None = None  # (C, D), computed at fit start, kept in checkpoints
        self._masks: dict[str, Tensor] = {}  # partly selected tensors: name -> (rows,) trainable rows
        self._hooks: list = []
        self._frozen_rows: dict[str, Tensor] | None = None

    # ---- stages and parameters ----

    @property
    def stages(self) -> tuple[Stage, ...]:
        if self.hparams.scheme == "adaptive":
            return (Stage("probe", self.hparams.probe_epochs, lr=self.hparams.probe_lr), Stage("selective"))
        return (Stage("selective"),)

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        params = dict(self.clip.model.named_parameters())
        if stage == "probe":
            self._set_row_masks({})
            return [params[n] for n in self._unit_params()]
        if self.selection is None:
            raise RuntimeError("stage 'selective' needs a selection: run the probe or resume from a checkpoint")
        chosen = set(self.selection["selected"])
        self._set_row_masks(row_masks(self.units, chosen))
        return [params[n] for n in self._unit_params(u for u in self.units if u.name in chosen)]

    def _unit_params(self, units: Iterable | None = None) -> list[str]:
        return list(dict.fromkeys(u.param for u in (self.units if units is None else units)))

    def train(self, mode: bool = True) -> "CLIPAST":
        super().train(mode)
        if self.teacher_visual is not None:
            self.teacher_visual.eval()  # frozen: no dropout, ever
        return self

    # ---- losses ----

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        text = self.class_embeddings(hp.classnames, hp.templates)  # (C, D), with grad when text tensors train
        image = self.clip.encode_image(images)  # (B, D)
        scale = self.clip.logit_scale.exp()
        logits = scale * image @ text.T  # (B, C)
        losses = {"ce": F.cross_entropy(logits, labels)}
        if self.stage != "selective":
            return losses
        if hp.text_consistency_weight or hp.logit_consistency_weight:
            teacher_text = self._teacher_features().to(image.device)  # (C, D)
        if self.teacher_visual is not None:
            if self._image_tower_is_pretrained():
                teacher_image = image.detach()  # the same weights: skip the second forward
            else:
                with torch.no_grad():
                    teacher_image = F.normalize(self.teacher_visual(images), dim=-1)  # (B, D)
        if hp.image_consistency_weight:
            losses["l1_image"] = hp.image_consistency_weight * consistency_l1(image, teacher_image)
        if hp.text_consistency_weight:
            losses["l1_text"] = hp.text_consistency_weight * consistency_l1(text, teacher_text)
        if hp.logit_consistency_weight:
            teacher_logits = scale.detach() * teacher_image.float() @ teacher_text.T  # (B, C)
            losses["kl"] = hp.logit_consistency_weight * consistency_kl(logits, teacher_logits)
        return losses

    def _image_tower_is_pretrained(self) -> bool:
        untouched = self.hparams.scheme != "adaptive" or self.hparams.restart_from_pretrained
        return untouched and not any(u.encoder == "image" for u in self._selected_units())

    def _teacher_features(self) -> Tensor:
        """(C, D) PromptSRC teacher text: mean over 60 templates of unnormalized features, normalized once.

        Computed once, at fit start, by the text tower while it still holds the pretrained weights
        (so no second text tower is kept), and saved in checkpoints.
        """
        if self._teacher_text is None:
            total = 0
            with torch.no_grad():
                for template in PROMPTSRC_TEMPLATES:
                    ids = self.clip.tokenize([template.format(c) for c in self.hparams.classnames])  # (C, 77)
                    chunks = [self.clip.encode_text(c.to(self.device), normalize=False) for c in ids.split(1000)]
                    total = total + torch.cat(chunks).float()  # (C, D), unnormalized
            self._teacher_text = F.normalize(total / len(PROMPTSRC_TEMPLATES), dim=-1)
        return self._teacher_text

    # ---- the stage boundary ----

    def setup(self, stage: str) -> None:
        super().setup(stage)
        # trainer.max_epochs counts the selective epochs (the paper's 30 / 20) whatever the scheme; the probe
        # comes on top, so the adaptive scheme trains as long as the random and BitFit controls. Set here,
        # before configure_optimizers derives the steps per epoch and the stage's cosine from max_epochs.
        loop = self.trainer.fit_loop
        counted = self._lengthened is not None and self._lengthened() is loop  # a second fit with this trainer
        if stage != "fit" or self.hparams.scheme != "adaptive" or counted:
            return
        selective = loop.max_epochs
        loop.max_epochs = selective + self.hparams.probe_epochs
        self._lengthened = weakref.ref(loop)
        rank_zero_info(
            f"clipadapt: CLIP-AST trains {self.hparams.probe_epochs} probe + {selective} selective epochs "
            f"(trainer.max_epochs counts the selective ones)"
        )

    def on_fit_start(self) -> None:
        if self.hparams.scheme == "adaptive" and self.trainer.max_epochs <= self.hparams.probe_epochs:
            raise ClipAdaptError("trainer.max_epochs=0 leaves no selective epoch after the probe: set it to 1 or more")
        if self.stage == "probe" and not isinstance(self.trainer.optimizers[0], torch.optim.Adam):  # AdamW is one
            raise TypeError(
                f"the probe scores from AdamW's second moments; got {type(self.trainer.optimizers[0]).__name__}"
            )
        if self.hparams.text_consistency_weight or self.hparams.logit_consistency_weight:
            self._teacher_features()  # now, while the text tower still holds the pretrained weights
        if self.stage == "selective":
            self._pretrained = None  # resumed past the probe
        if self.selection is not None:
            self._record_selection()

    def on_stage_end(self, stage: str) -> None:
        if stage != "probe":
            return
        optimizer = self.trainer.optimizers[0]
        scores = importance_scores(
            optimizer, dict(self.clip.model.named_parameters()), self.units, self.hparams.importance
        )
        # Gradients are all-reduced, so every rank holds the same moments; rank 0's word is final anyway.
        self.selection = self.trainer.strategy.broadcast(self._make_selection(scores), src=0)
        if self._pretrained is not None:
            params = dict(self.clip.model.named_parameters())
            with torch.no_grad():
                for name, value in self._pretrained.items():
                    params[name].copy_(value)
            self._pretrained = None
        self._record_selection()

    def _make_selection(self, scores: dict[str, float] | None) -> dict[str, Any]:
        hp = self.hparams
        selected = select_units(self.candidates, hp.scheme, hp.granularity, hp.top_k, scores, self.selection_seed)
        shapes = {n: p.shape for n, p in self.clip.model.named_parameters()}
        chosen = set(selected)
        count = sum(_numel(shapes[u.param], u.rows) for u in self.units if u.name in chosen)
        options = ("scheme", "granularity", "top_k", "encoders", "importance", "split_qkv")
        return {
            **{k: hp[k] for k in options},
            "selection_seed": self.selection_seed,
            "selected": selected,
            "trainable_params": count,
            "scores": None if scores is None else {k: (None if math.isinf(v) else v) for k, v in scores.items()},
        }

    def _selected_units(self) -> list:
        chosen = set(self.selection["selected"]) if self.selection else set()
        return [u for u in self.units if u.name in chosen]

    def _record_selection(self) -> None:
        """selection.json in the run folder, #trainable params and one heatmap per encoder to TensorBoard."""
        sel = self.selection
        grids = {e: selection_grid(self.units, e, sel["scores"], sel["selected"]) for e in ("image", "text")}
        self.write_json("selection.json", {**sel, "grids": grids})
        self._log_selection(grids)

    @rank_zero_only
    def _log_selection(self, grids: dict[str, Any]) -> None:
        sel = self.selection
        rank_zero_info(
            f"clipadapt: CLIP-AST selected {len(sel['selected'])} tensors, {sel['trainable_params']:,} parameters"
        )
        if self.logger is not None:
            self.logger.log_metrics({"train/trainable_params": sel["trainable_params"]}, step=self.global_step)
        if isinstance(self.logger, TensorBoardLogger):
            for encoder, grid in grids.items():
                picture = _heatmap(grid, f"{encoder} encoder: {sel['scheme']}, K={sel['top_k']}")
                if picture is not None:
                    self.logger.experiment.add_image(
                        f"selection/{encoder}", picture, self.global_step, dataformats="HWC"
                    )

    # ---- split q/k/v: row gradient masks ----

    def _set_row_masks(self, masks: dict[str, tuple[int, list[tuple[int, int]]]]) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks, self._frozen_rows, self._masks = [], None, {}
        for name, (rows, kept) in masks.items():
            keep = torch.zeros(rows, dtype=torch.bool)
            for start, stop in kept:
                keep[start:stop] = True
            self._masks[name] = keep

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Hooks need requires_grad, which the base sets only after `trainable`: install them here.
        if self._masks and self._frozen_rows is None:
            params = dict(self.clip.model.named_parameters())
            self._frozen_rows = {}
            for name, keep in self._masks.items():
                keep = self._masks[name] = keep.to(params[name].device)
                self._hooks.append(params[name].register_hook(partial(_mask_rows, keep=keep)))
                self._frozen_rows[name] = params[name].detach()[~keep].clone()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._frozen_rows:
            params = dict(self.clip.model.named_parameters())
            with torch.no_grad():
                for name, rows in self._frozen_rows.items():
                    params[name][~self._masks[name]] = rows  # undo AdamW's decay of the frozen rows

    # ---- state ----

    def method_state(self) -> dict[str, Any]:
        text = None if self._teacher_text is None else self._teacher_text.detach().cpu()
        return {"selection": self.selection, "teacher_text": text}

    def load_method_state(self, state: dict[str, Any]) -> None:
        selection = state.get("selection")
        if selection is not None:
            unknown = set(selection["selected"]) - {u.name for u in self.units}
            if unknown:
                raise ValueError(f"the checkpoint's selection names tensors this model lacks: {sorted(unknown)[:3]}")
            self.selection = selection
        if state.get("teacher_text") is not None:
            self._teacher_text = state["teacher_text"]


def _numel(shape: torch.Size, rows: tuple[int, int] | None) -> int:
    """Elements of a unit: the whole tensor, or its rows."""
    return math.prod(shape) if rows is None else (rows[1] - rows[0]) * math.prod(shape[1:])


def _mask_rows(grad: Tensor, keep: Tensor) -> Tensor:
    return grad * keep.view(-1, *([1] * (grad.dim() - 1))).to(grad.dtype)


def _drop_teacher(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}{TEACHER}.")]:
        del state_dict[key]


def _ignore_missing_teacher(module: nn.Module, incompatible: Any) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if f"{TEACHER}." not in k]


def _heatmap(grid: dict[str, Any], title: str) -> np.ndarray | None:
    """(H, W, 3) uint8 picture of one encoder's selection: colour = log10 score, dot = selected (Fig. 5)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:  # matplotlib is a dev extra: no picture, the JSON still has everything
        return None
    if not grid["blocks"]:
        return None
    scores = np.array([[np.nan if v is None else v for v in row] for row in grid["scores"]], dtype=float)
    selected = np.array(grid["selected"], dtype=bool)
    has_scores = np.isfinite(scores).any()
    values = np.log10(np.clip(scores, 1e-30, None)) if has_scores else selected.astype(float)
    kinds, blocks = grid["kinds"], grid["blocks"]
    fig = Figure(figsize=(1.5 + 0.4 * len(kinds), 1.8 + 0.3 * len(blocks)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ys, xs = np.nonzero(selected)
    ax.scatter(xs, ys, s=18, c="red", marker="o", label="selected")
    ax.set_xticks(range(len(kinds)), kinds, rotation=90, fontsize=7)
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=7)
    ax.set_ylabel("block")
    ax.set_title(title, fontsize=8)
    if has_scores:
        fig.colorbar(image, ax=ax, label="log10 score")
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
