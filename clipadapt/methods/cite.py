"""CLIP-CITE: full fine-tuning of CLIP with alignment, class-level contrastive and distillation losses.

Liu, Li, Yu, "Fully Fine-tuned CLIP Models are Efficient Few-Shot Learners", arXiv 2407.04003 (2024).

Every weight of CLIP trains (both towers), plus a cosine head W (C, D) initialised from the frozen
text features of the class prompt t_c = "a photo of a {c}.":

    L = L_DVA + λ·L_SCL + η·L_VLD                                             (Eq. 6; λ = 0.7, η = 0.1)
    L_DVA: CE of s·cos(θ_I(x), w_c) over W (Eq. 3); W, not the text tower, carries this term
    L_SCL: class-level image↔text contrastive over the batch's class prompts θ_T(t_c) (Eq. 4)
    L_VLD: KL(p_zs ‖ p), p = softmax_c s·cos(θ_I(x), θ_T(t_c)) over the C class prompts (Eq. 5)

At the end of fit both towers become the weight-space ensemble (WiSE-FT, Eq. 7)
θ̂ = α·θ + (1 − α)·θ_zs, α = 0.5, and the text features are recomputed: that is the model tested
after fit and exported. Base classes are scored with the ensembled text tower (`eval_head: text`);
`eval_head: head` scores the training classes with W instead.

Decisions where the paper is open (specs/cite.md): the logit scale s is frozen; SCL image→text is a
softmax over the distinct class prompts of the batch, text→image keeps only other-class images as
negatives, both a mean over the images as Eq. 4 sums per (image, class) pair
(losses.class_contrastive_loss); under DDP, SCL's batch is the images of all ranks (gathered with
their gradient), so the loss and its gradient do not change with the number of devices; VLD has
temperature 1 and a batch mean; AdamW with weight decay 0.01 and one linear warmup epoch.
Implementation choices (not in the paper):
- Losses are batch means (the paper writes sums), which only rescales the learning rate.
- With `eval_head: head`, W is interpolated with its initialisation like the towers (in WiSE-FT the
  head is part of θ); the towers are interpolated in every case.
- θ_zs (for Eq. 7) is part of the state dict, so a checkpoint alone resumes, tests and exports
  the right ensemble whatever `pretrained` is (`clipadapt export` rebuilds a module with random
  weights and loads the state dict): its image tower is `teacher`, the frozen zero-shot image tower
  that also serves VLD (no second CLIP on the device; text features cached in `teacher_text`), and
  the rest (text tower) is a CPU copy saved as the module's extra state. This adds the size of one
  CLIP to a checkpoint that already holds two AdamW moments per weight.
- Which weights the module holds is tracked in `weights` (zeroshot → finetuned → ensembled), also
  in the extra state. ModelCheckpoint saves during fit, so its checkpoints hold `finetuned` weights:
  `export_state_dict` returns their ensemble, evaluation outside fit (`clipadapt test --ckpt_path`,
  validate, predict) ensembles them first, a resumed fit ensembles once at its end, and training on
  ensembled weights is refused rather than ensembling twice. For the same reason a checkpoint of
  ensembled weights refuses another `ensemble_alpha` at test time (one saved during fit takes it).
- `clipadapt export` with `eval_head: head` also writes W (ensembled like the towers) beside the weights.
"""

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from clipadapt.errors import ClipAdaptError
from clipadapt.losses import alignment_loss, class_contrastive_loss, similarity_distillation_loss
from clipadapt.methods.base import AdaptationModule

EVAL_HEADS = ("text", "head")


def weight_ensemble(finetuned: dict[str, Tensor], zeroshot: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """θ̂ = α·θ + (1 − α)·θ_zs for every floating tensor (Eq. 7); exact at α = 0 and α = 1."""
    return {
        name: alpha * tensor + (1 - alpha) * zeroshot[name].to(tensor) if tensor.is_floating_point() else tensor
        for name, tensor in finetuned.items()
    }


class CLIPCITE(AdaptationModule):
    """Full fine-tuning with DVA + SCL + VLD, then a weight-space ensemble with zero-shot CLIP."""

    # α and the head are applied when a checkpoint saved during fit is evaluated (the ensemble happens then).
    test_time_args = AdaptationModule.test_time_args | {"ensemble_alpha", "eval_head"}

    def __init__(
        self,
        *args: Any,
        contrastive_weight: float = 0.7,  # λ, Eq. 6
        distillation_weight: float = 0.1,  # η, Eq. 6
        ensemble_alpha: float = 0.5,  # α, Eq. 7 (1: no ensemble, 0: zero-shot CLIP)
        eval_head: str = "text",
        class_template: str = "a photo of a {}.",  # t_c of DVA, SCL and VLD
        **kwargs: Any,
    ) -> None:
        """
        Args:
            contrastive_weight: λ, weight of L_SCL.
            distillation_weight: η, weight of L_VLD (0 skips the teacher forward).
            ensemble_alpha: α of the weight-space ensemble applied at the end of fit.
            eval_head: `text` scores every evaluation set with the (ensembled) text tower and `prompts`;
                `head` scores the training classes with W (other sets still use the text tower).
            class_template: the class prompt t_c used in training.
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if eval_head not in EVAL_HEADS:
            raise ValueError(f"eval_head must be one of {EVAL_HEADS}, got {eval_head!r}")
        if not 0.0 <= ensemble_alpha <= 1.0:
            raise ValueError(f"ensemble_alpha must lie in [0, 1], got {ensemble_alpha}")
        if "{}" not in class_template:
            raise ValueError(f"class_template needs a {{}} for the class name, got {class_template!r}")
        # θ_zs of Eq. 7, taken before any step: the image tower on the device (it is also the VLD teacher),
        # everything else as a CPU copy.
        self.teacher = copy.deepcopy(self.clip.model.visual).requires_grad_(False).eval()
        self._zeroshot_rest = {
            name: tensor.detach().to("cpu", copy=True)
            for name, tensor in self.clip.model.state_dict().items()
            if not name.startswith("visual.")
        }
        tokens = self.clip.tokenize([class_template.format(c) for c in self.hparams.classnames])  # (C, 77)
        self.register_buffer("class_tokens", tokens, persistent=False)
        with torch.no_grad():
            self.register_buffer("teacher_text", self.clip.encode_text(tokens))  # (C, D) unit, zero-shot
        self.head = nn.Parameter(self.teacher_text.clone())  # (C, D): W of Eq. 3
        self.weights = "zeroshot"  # -> finetuned (first step) -> ensembled (end of fit)

    # ---- training ----

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        yield self.head
        logit_scale = self.clip.logit_scale  # frozen (spec decision): s stays CLIP's
        yield from (p for p in self.clip.model.parameters() if p is not logit_scale)

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        scale = self.clip.logit_scale.exp()  # s
        image = self.clip.encode_image(images)  # (B, D) unit
        losses = {"dva": alignment_loss(image, self.head, labels, scale)}
        # SCL contrasts the whole batch: under DDP, the images of every rank, gathered with their gradient.
        all_images, all_labels = self._gather(image), self._gather(labels)  # (N, D), (N,); N = B · world size
        classes, targets = all_labels.unique(return_inverse=True)  # (K,), (N,) row of each image's class
        distill = self.hparams.distillation_weight > 0
        # VLD needs every class prompt through the text tower, SCL only the K of the batch: encode once.
        text = self.clip.encode_text(self.class_tokens if distill else self.class_tokens[classes])  # (C | K, D)
        batch_text = text[classes] if distill else text  # (K, D)
        scl = class_contrastive_loss(all_images, batch_text, targets, scale)
        losses["scl"] = self.hparams.contrastive_weight * scl
        if distill:
            with torch.no_grad():
                teacher_image = F.normalize(self.teacher(images), dim=-1)  # (B, D)
            teacher_logits = scale * teacher_image @ self.teacher_text.T  # (B, C)
            vld = similarity_distillation_loss(scale * image @ text.T, teacher_logits)
            losses["vld"] = self.hparams.distillation_weight * vld
        return losses

    def _gather(self, tensor: Tensor) -> Tensor:
        """(B, ...) -> (world size · B, ...): every rank's rows, differentiable, in rank order; as is on one device.

        Every rank then computes the same SCL over the global batch; all_gather's backward sends each rank
        the summed gradient of its own rows and DDP's mean over ranks undoes the sum, so the gradient is
        that of one process holding the whole batch, whatever the number of devices.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return tensor
        return self.all_gather(tensor, sync_grads=True).flatten(0, 1)

    def train(self, mode: bool = True) -> "CLIPCITE":
        """Set train/eval mode; the teacher stays in eval mode."""
        super().train(mode)
        self.teacher.eval()
        return self

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.weights == "ensembled":
            raise RuntimeError(
                "CLIP-CITE: these weights are already the final weight-space ensemble; training on them would "
                "ensemble twice. Resume from a checkpoint saved during fit (ModelCheckpoint's), not after it."
            )
        self.weights = "finetuned"

    # ---- the weight-space ensemble (Eq. 7) ----

    def apply_ensemble(self) -> None:
        """Replace both towers (and W) by α·θ + (1 − α)·θ_zs in place, once; text features are recomputed."""
        if self.weights != "finetuned":
            return  # zero-shot weights are their own ensemble; ensembled ones must not be mixed again
        alpha = self.hparams.ensemble_alpha
        with torch.no_grad():
            self.clip.model.load_state_dict(
                weight_ensemble(self.clip.model.state_dict(), self.zeroshot_weights(), alpha)
            )
            self.head.copy_(alpha * self.head + (1 - alpha) * self.teacher_text)
        self.weights = "ensembled"
        self._text_cache.clear()
        rank_zero_info(f"CLIP-CITE: weight-space ensemble applied, alpha={alpha}")

    def on_fit_end(self) -> None:
        self.apply_ensemble()

    def on_validation_start(self) -> None:
        if self.trainer.state.fn != TrainerFn.FITTING:  # `clipadapt validate` of a checkpoint
            self.apply_ensemble()

    def on_test_start(self) -> None:
        self.apply_ensemble()

    def on_predict_start(self) -> None:
        self.apply_ensemble()

    def export_state_dict(self) -> dict[str, Tensor]:
        """The ensembled open_clip state dict, also from a checkpoint saved before the ensemble (+ W with `head`)."""
        weights, alpha = super().export_state_dict(), self.hparams.ensemble_alpha
        finetuned = self.weights == "finetuned"
        if finetuned:
            weights = weight_ensemble(weights, self.zeroshot_weights(), alpha)
        if self.hparams.eval_head == "head":  # W scores the training classes: it is part of the model
            head = alpha * self.head + (1 - alpha) * self.teacher_text if finetuned else self.head
            weights["head"] = head.detach()  # (C, D), as `apply_ensemble` would leave it
        return weights

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get("hyper_parameters", {}).get("ensemble_alpha", self.hparams.ensemble_alpha)
        ensembled = checkpoint["state_dict"].get("_extra_state", {}).get("weights") == "ensembled"
        if ensembled and saved != self.hparams.ensemble_alpha:
            raise ClipAdaptError(
                f"this CLIP-CITE checkpoint holds weights already ensembled with ensemble_alpha={saved}, so "
                f"ensemble_alpha={self.hparams.ensemble_alpha} cannot take effect: pass a checkpoint saved during fit "
                "(a run's checkpoints/), or drop the flag"
            )

    # ---- evaluation and checkpoints ----

    def class_embeddings(self, classnames: list[str], templates: list[str]) -> Tensor:
        rows = self.head_rows(self.head, classnames) if self.hparams.eval_head == "head" else None
        return rows if rows is not None else super().class_embeddings(classnames, templates)

    def zeroshot_weights(self) -> dict[str, Tensor]:
        """θ_zs as an open_clip state dict: the teacher's image tower and the CPU copy of the rest."""
        visual = {f"visual.{name}": tensor for name, tensor in self.teacher.state_dict().items()}
        return visual | self._zeroshot_rest

    def get_extra_state(self) -> dict[str, Any]:
        """Saved in the state dict: which weights the module holds and θ_zs outside the image tower."""
        return {"weights": self.weights, "zeroshot_rest": self._zeroshot_rest}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `get_extra_state()` from a state dict."""
        self.weights = state["weights"]
        self._zeroshot_rest = {name: tensor.to("cpu") for name, tensor in state["zeroshot_rest"].items()}
        self._text_cache.clear()
