"""Adapt: deep key/value prompts in both towers, iteratively pruned to a token budget.

Paper: Huang, Pedapati, Chen, Gao, "Adapt: Adaptive Prompt Tuning for Pre-trained Vision-Language
Models" (ICLR 2025 submission, later TMLR). Spec: shared/specs/adapt.md.

The backbone is frozen; only ξ prompt tokens per block of each tower train (`MaskedPrompts`), entering
keys and values only (Eq. 7). After `prune_after_epochs` warmup epochs, each optimizer step adds the
token scores (Eq. 6, `clipadapt.pruning`) to accumulators S; every n_k steps the r_p live tokens with
the lowest S are pruned and S is reset, until Σ live = T_target (Algorithm 1, Eq. 5):

    min_{P, M} L(P ⊙ M)   s.t.   Σ_{b, l} ‖M_{b,l}‖_0 = T_target

Decisions the paper leaves open (spec "Decision"s, each an option): the score is reduced over the
width by its mean (`score_reduce`), one global ranking and budget over both towers (`budget`), a
pruned token is dropped from K/V. The LR warmup of the base (`warmup_epochs`) and the pruning warmup
(`prune_after_epochs`, the paper's "warmup epochs") are separate options. The angular distillation
loss of the TMLR version is not implemented (CE only, as in the ICLR version).

Reaching T_target (not in the paper, whose r_p = 4, n_k = 80 leave EuroSAT at 16 shots and batch 4,
40 steps per epoch, with 47 pruning steps: 196 of 384 tokens instead of 128). At fit start the
schedule is checked with the real optimizer steps per epoch: by `target_epoch` (default: the last) it
has W = ⌊(target_epoch − prune_after_epochs) · steps / n_k⌋ pruning steps. If W·r_p cannot reach
T_target, `unreachable: raise_rate` (default) prunes ⌈excess / W⌉ tokens per step instead, with a
warning; `error` refuses. The pruning rate is what is derived, not n_k: n_k is the paper's number
of minibatches a score is summed over (the quality of the ranking), r_p only how many tokens a step
removes. The paper's r_p is kept wherever it suffices. A `target_length` at or above the prompt pool
(Σ blocks · ξ, per tower under `per_branch`) would prune nothing and is refused at fit start too.

State: masks, score accumulators and the step counter are buffers, so checkpoints resume mid-window.
Outputs: masks.json in the run dir (with the r_p in use), TensorBoard mask images and per-block live
counts, the live parameter count and the extra K/V cost, the final live count as `prompts/live` in
test_metrics.json; `export_state_dict` keeps only live tokens.
"""

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from clipadapt.errors import ClipAdaptError
from clipadapt.methods.base import AdaptationModule
from clipadapt.models.prompts import CompactPrompts, MaskedPrompts
from clipadapt.pruning import (
    accumulate,
    live_after,
    live_per_layer,
    prune_step,
    pruning_rate,
    split_budget,
    token_scores,
)

MASK_PIXELS = 8  # each token of a mask picture is an 8x8 square, so a 12x16 mask is readable


class Adapt(AdaptationModule):
    """Masked deep K/V prompts in both towers, pruned by accumulated Snip/grad/L2 scores to T_target tokens."""

    native_towers = ("image", "text")  # the learned prompts enter through these towers' layer seams

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        max_length: int = 16,  # ξ, tokens per block and tower at start
        target_length: int = 128,  # T_target, Eq. 5 / Alg. 1
        prune_per_step: int = 4,  # r_p, Alg. 1
        accumulate_steps: int = 80,  # n_k, Alg. 1
        prune_after_epochs: int = 5,  # warmup epochs of Alg. 1 (no pruning before)
        target_epoch: int | None = None,  # T_target is reached by the end of this epoch (None: the last)
        unreachable: str = "raise_rate",  # r_p, n_k too slow for that: raise_rate | error
        score: str = "snip",  # Eq. 6: snip | grad | l2
        score_reduce: str = "mean",
        budget: str = "global",
        text_budget_ratio: float = 0.5,
        init_std: float = 0.02,
        prompts: str = "simple",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            max_length: ξ, prompt tokens per block of each tower before pruning.
            target_length: T_target, live tokens (both towers together) where pruning stops.
            prune_per_step: r_p, tokens pruned at each pruning step.
            accumulate_steps: n_k, optimizer steps whose scores are summed before each pruning step.
            prune_after_epochs: epochs of training before the first score is accumulated.
            target_epoch: T_target must be reached within this many epochs (None: trainer.max_epochs).
            unreachable: when r_p tokens every n_k steps cannot reach T_target by `target_epoch` (checked at fit
                start from the real optimizer steps per epoch): `raise_rate` prunes the fewest tokens per
                step that can (a warning says so; the paper's r_p is kept when it suffices), `error` refuses.
            score: snip (|g ⊙ P|) | grad (|g|) | l2 (|P|), each reduced over the width.
            score_reduce: mean | sum over the width (mean compares towers of different widths fairly).
            budget: global (one ranking over both towers) | per_branch (T_target split by `text_budget_ratio`).
            text_budget_ratio: share of T_target kept by the text tower under `budget: per_branch`.
            init_std: the prompts' N(0, σ) initialisation.
            prompts: the text template set (default "a photo of a {}.", the paper's; `dataset` for CoOp's).
            **kwargs: the AdaptationModule options (arch, pretrained, optimizer, warmup, ...).
        """
        super().__init__(classnames, templates, prompts=prompts, **kwargs)
        self.save_hyperparameters()
        if score not in ("snip", "grad", "l2") or score_reduce not in ("mean", "sum"):
            raise ValueError(
                f"score must be snip | grad | l2 and score_reduce mean | sum, got {score!r}, {score_reduce!r}"
            )
        if budget not in ("global", "per_branch"):
            raise ValueError(f"budget must be global | per_branch, got {budget!r}")
        if prune_per_step < 1 or accumulate_steps < 1 or target_length < 0:
            raise ValueError("prune_per_step and accumulate_steps must be >= 1 and target_length >= 0")
        if unreachable not in ("raise_rate", "error"):
            raise ValueError(f"unreachable must be raise_rate | error, got {unreachable!r}")
        layers = {tower: len(self.clip.blocks(tower)) for tower in ("image", "text")}
        widths = {"image": self.clip.width_image, "text": self.clip.width_text}
        self.kv_prompts = MaskedPrompts(layers, widths, max_length, init_std)
        for tower in self.kv_prompts.towers:
            self.register_buffer(f"score_{tower}", torch.zeros(layers[tower], max_length))  # S_b, (L, ξ)
        self.register_buffer("score_steps", torch.zeros((), dtype=torch.long))  # steps summed into S so far
        self.target = split_budget(target_length, text_budget_ratio) if budget == "per_branch" else target_length
        self.pool = {tower: layers[tower] * max_length for tower in self.kv_prompts.towers}  # tokens at start
        self.prune_rate = prune_per_step  # r_p in use; raised at fit start if the schedule needs it

    # ---- parameters and forward ----

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return [self.kv_prompts.tokens(tower) for tower in self.kv_prompts.towers]

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        image = self.clip.encode_image(images, prompts=self.kv_prompts)  # (B, D)
        return self.clip.logit_scale.exp() * image @ text.T  # (B, C)

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        losses = super().training_losses(images, labels)
        # A tower whose tokens are all pruned gets no gradient, and DDP's reducer (without
        # find_unused_parameters) fails on a trainable parameter that took no part: a zero term keeps it in.
        unused = [self.kv_prompts.tokens(t) for t, m in self.kv_prompts.masks().items() if not m.any()]
        if unused:
            losses["ce"] = losses["ce"] + 0.0 * sum(p.sum() for p in unused)
        return losses

    def encode_classes(self, classnames: list[str], templates: list[str]) -> Tensor:
        return self.clip.text_features(classnames, templates, prompts=self.kv_prompts)

    def text_trainable(self) -> bool:
        return self.kv_prompts.tokens("text").requires_grad or super().text_trainable()

    # ---- pruning (Algorithm 1) ----

    def _check_budget(self) -> None:
        """A budget at or above the prompt pool would prune nothing: refuse it."""
        hp = self.hparams
        sizes = " + ".join(f"{n // hp.max_length} {tower}" for tower, n in self.pool.items())
        pool = f"({sizes} blocks x max_length={hp.max_length})"
        if not isinstance(self.target, dict):
            if self.target >= sum(self.pool.values()):
                raise ClipAdaptError(
                    f"Adapt: target_length={hp.target_length} is at or above the {sum(self.pool.values())} prompt "
                    f"tokens of this model {pool}: nothing would be pruned; lower target_length or raise max_length"
                )
            return
        for tower, target in self.target.items():
            if target >= self.pool[tower]:
                raise ClipAdaptError(
                    f"Adapt: budget per_branch gives the {tower} tower {target} of target_length={hp.target_length}, "
                    f"at or above its {self.pool[tower]} prompt tokens {pool}: it would prune nothing; lower "
                    f"target_length or change text_budget_ratio"
                )

    def on_fit_start(self) -> None:
        # Algorithm 1 prunes r_p tokens every n_k steps: with few images per epoch (EuroSAT: 40 steps at
        # batch 4) that may end training far above T_target. Check with the real steps per epoch.
        self._check_budget()
        hp, trainer = self.hparams, self.trainer
        by_epoch = trainer.max_epochs if hp.target_epoch is None else hp.target_epoch
        if by_epoch > trainer.max_epochs:
            raise ClipAdaptError(f"Adapt: target_epoch={by_epoch} is past trainer.max_epochs={trainer.max_epochs}")
        per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)  # optimizer steps
        windows = max(0, by_epoch - hp.prune_after_epochs) * per_epoch // hp.accumulate_steps
        schedule = (
            f"{windows} pruning steps (one per accumulate_steps={hp.accumulate_steps} optimizer steps, "
            f"{per_epoch} per epoch, from epoch {hp.prune_after_epochs + 1} to {by_epoch})"
        )
        if windows == 0:
            raise ClipAdaptError(
                f"Adapt: {schedule} cannot prune towards target_length={hp.target_length}; lower accumulate_steps "
                f"or prune_after_epochs, or train longer"
            )
        needed = pruning_rate(self.pool, self.target, windows)
        self.prune_rate = max(hp.prune_per_step, needed)
        if needed <= hp.prune_per_step:
            return
        left = live_after(self.pool, self.target, windows, hp.prune_per_step)
        problem = (
            f"Adapt: {schedule} of prune_per_step={hp.prune_per_step} tokens leave {left} of "
            f"{sum(self.pool.values())} prompt tokens, not target_length={hp.target_length}"
        )
        if hp.unreachable == "error":
            raise ClipAdaptError(
                f"{problem}; set prune_per_step >= {needed}, lower accumulate_steps, or unreachable: raise_rate"
            )
        rank_zero_warn(f"{problem}: pruning {needed} tokens per step instead (unreachable: error refuses)")

    def pruning_active(self) -> bool:
        """Whether scores accumulate now: past the warmup epochs and above the budget."""
        if self.current_epoch < self.hparams.prune_after_epochs:
            return False
        masks = self.kv_prompts.masks()
        if isinstance(self.target, dict):
            return any(int(masks[t].sum()) > self.target[t] for t in masks)
        return self.kv_prompts.live() > self.target

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # The gradients are final here (all-reduced under DDP) and not yet cleared.
        if not self.pruning_active():
            return
        hp = self.hparams
        scores = {
            tower: token_scores(
                self.kv_prompts.tokens(tower), self.kv_prompts.tokens(tower).grad, hp.score, hp.score_reduce
            )
            for tower in self.kv_prompts.towers
        }  # tower -> (L, ξ)
        accumulate(self._scores(), scores)
        self.score_steps += 1

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if int(self.score_steps) < self.hparams.accumulate_steps:
            return
        masks = prune_step(self._scores(), self.kv_prompts.masks(), self.prune_rate, self.target)
        # Gradients are all-reduced, so ranks agree already; rank 0's decision is final regardless.
        masks = self.trainer.strategy.broadcast({t: m.cpu() for t, m in masks.items()}, src=0)
        self.kv_prompts.set_masks(masks)
        for value in self._scores().values():
            value.zero_()
        self.score_steps.zero_()
        self._record()

    def _scores(self) -> dict[str, Tensor]:
        return {tower: getattr(self, f"score_{tower}") for tower in self.kv_prompts.towers}

    # ---- outputs ----

    def on_train_start(self) -> None:
        super().on_train_start()
        self._record()

    def on_fit_end(self) -> None:
        self._record()

    def run_summary(self) -> dict[str, Any]:
        return super().run_summary() | {"prompts/live": self.kv_prompts.live()}

    def extra_kv_fraction(self) -> dict[str, float]:
        """Per tower: live prompt tokens per block relative to the tower's sequence length (extra attention keys)."""
        grid = self.clip.model.visual.grid_size
        lengths = {"image": grid[0] * grid[1] + 1, "text": self.clip.context_length}  # text: untruncated bound
        return {
            tower: float(mask.sum()) / (len(mask) * lengths[tower]) for tower, mask in self.kv_prompts.masks().items()
        }

    def _record(self) -> None:
        """masks.json in the run dir; live counts, #parameters, K/V cost and mask pictures to the logger."""
        masks = {tower: mask.cpu() for tower, mask in self.kv_prompts.masks().items()}
        per_layer = live_per_layer(masks)
        live, params = self.kv_prompts.live(), self.kv_prompts.live_parameters()
        summary = {
            "step": self.global_step,
            "live": live,
            "target_length": self.hparams.target_length,
            "prune_per_step": self.prune_rate,
            "live_per_layer": per_layer,
            "trainable_params": params,
            "masks": {tower: mask.int().tolist() for tower, mask in masks.items()},
        }
        self.write_json("masks.json", summary)
        if not self.trainer.is_global_zero:
            return
        rank_zero_info(f"clipadapt: Adapt step {self.global_step}: {live} live prompt tokens {per_layer}")
        if self.logger is None:
            return
        metrics: dict[str, float] = {"prompts/live": live, "prompts/trainable_params": params}
        for tower, counts in per_layer.items():
            metrics.update({f"prompts/live_{tower}/layer_{i:02d}": c for i, c in enumerate(counts)})
        metrics.update({f"prompts/extra_kv_fraction_{t}": v for t, v in self.extra_kv_fraction().items()})
        self.logger.log_metrics(metrics, step=self.global_step)
        if isinstance(self.logger, TensorBoardLogger):
            for tower, mask in masks.items():
                picture = np.kron(mask.numpy().astype(np.uint8) * 255, np.ones((MASK_PIXELS, MASK_PIXELS), np.uint8))
                self.logger.experiment.add_image(f"prompts/mask_{tower}", picture, self.global_step, dataformats="HW")

    # ---- export ----

    def compact_prompts(self) -> CompactPrompts:
        """Only the live tokens, per block: pass as `prompts=` to the backbone's encoders."""
        return self.kv_prompts.compact()

    def export_state_dict(self) -> dict[str, Tensor]:
        """The frozen open_clip weights plus `prompts.{tower}.{layer}` (P_l, W) live tokens.

        Not loadable by plain open_clip (it has no prompt seam): rebuild the prompts with
        `CompactPrompts.from_state(extras)` and pass them to `CLIPBackbone.encode_*(..., prompts=)`.
        """
        return self.clip.model.state_dict() | self.compact_prompts().state()
