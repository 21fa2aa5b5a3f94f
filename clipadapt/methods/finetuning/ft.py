"""FT, LP-FT and WiSE-FT: fine-tuning CLIP's image tower end to end, and its weight-space ensemble.

- FT: every weight of the image tower trains on CE against the frozen zero-shot text head,
  logits = s · f̂_θ(x) · ŵ_cᵀ with ŵ_c the `prompts` ensemble of the class names (80 templates for
  ImageNet, as WiSE-FT); the text tower stays frozen, its features are computed once.
- LP-FT: Kumar, Raghunathan, Jones, Ma, Liang, "Fine-Tuning can Distort Pretrained Features and
  Underperform Out-of-Distribution", ICLR 2022, arXiv 2202.10054. Stage `probe`: a linear head W
  (C, D), initialised from the zero-shot text features, trains on the frozen tower; stage `finetune`:
  the image tower and W train together, from the probed head (logits = s · f̂_θ(x) · normalize(W)ᵀ).
- WiSE-FT: Wortsman, Ilharco, Kim, Li, Kornblith, Roelofs, Gontijo-Lopes, Hajishirzi, Farhadi,
  Namkoong, Schmidt, "Robust fine-tuning of zero-shot models", CVPR 2022, arXiv 2109.01903. The
  evaluated and exported model is the weight-space ensemble (Eq. 1)

      θ_wise = α · θ_ft + (1 − α) · θ_zs,   α = `wise_alpha`

  of the fine-tuned and the zero-shot image tower (and, for LP-FT, of W and its zero-shot init);
  `cite.weight_ensemble` computes it. `wise_alpha` is an option of all three: 1 is plain FT / LP-FT.

Decisions: the ensemble is applied at evaluation time (`models.weights.call_with_weights`), never in
place, so the module and every checkpoint hold θ_ft, and one fit is tested at another α with
`FT.load_from_checkpoint(CKPT, wise_alpha=A)` (LightningCLI's `--ckpt_path` would replace a
command-line `wise_alpha` by the checkpoint's). θ_zs of the image tower is kept in
the state dict (`zeroshot_visual`), so a checkpoint alone tests and exports the ensemble whatever
`pretrained` is; it costs one image tower of memory and checkpoint size. Deviations: FT's head is
frozen (WiSE-FT's end-to-end runs also train the head); LP-FT's probe is a few AdamW epochs on the
cosine head instead of an L-BFGS logistic regression run to convergence; no head bias.
"""

import copy
from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule, Stage
from clipadapt.methods.cite import weight_ensemble
from clipadapt.models.weights import call_with_weights


class FT(AdaptationModule):
    """The image tower fine-tunes against the frozen zero-shot text head; WiSE-FT ensemble when `wise_alpha` < 1."""

    # The checkpoint holds both towers, so a test of it may mix them with any α (`clipadapt test --ckpt_path`).
    test_time_args = AdaptationModule.test_time_args | {"wise_alpha"}

    def __init__(self, *args: Any, wise_alpha: float = 1.0, **kwargs: Any) -> None:
        """
        Args:
            wise_alpha: α of θ = α·θ_ft + (1 − α)·θ_zs used for evaluation and export (1: no ensemble).
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if not 0.0 <= wise_alpha <= 1.0:
            raise ValueError(f"wise_alpha must lie in [0, 1], got {wise_alpha}")
        self.zeroshot_visual = copy.deepcopy(self.clip.model.visual).requires_grad_(False)  # θ_zs of the image tower

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return (p for _, p in self.clip.image_parameters())

    def ensembling(self) -> bool:
        """Whether this forward uses the WiSE ensemble: in evaluation (not training) with α < 1."""
        return not self.training and self.hparams.wise_alpha < 1.0

    def ensembled_visual(self) -> dict[str, Tensor]:
        """α·θ_ft + (1 − α)·θ_zs of the image tower, named as in `clip.model`."""
        tuned = dict(self.clip.model.visual.named_parameters())
        zeroshot = dict(self.zeroshot_visual.named_parameters())
        return {f"visual.{n}": t for n, t in weight_ensemble(tuned, zeroshot, self.hparams.wise_alpha).items()}

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        if self.ensembling():
            features = call_with_weights(self.clip.model, self.ensembled_visual(), self.clip.encode_image, images)
        else:
            features = self.clip.encode_image(images)  # (B, D)
        return self.clip.logits(features, text)  # scale·cos (+ SigLIP's bias)

    def export_state_dict(self) -> dict[str, Tensor]:
        """A plain open_clip state dict: the image tower is the WiSE ensemble (θ_ft itself when α = 1)."""
        visual = {n: t.detach() for n, t in self.ensembled_visual().items()}
        return super().export_state_dict() | visual


class LPFT(FT):
    """Linear probe (stage `probe`: the head only), then fine-tuning of the image tower with the head (`finetune`)."""

    def __init__(
        self,
        *args: Any,
        probe_epochs: int = 5,
        probe_lr: float = 1e-3,
        finetune_lr: float | None = None,  # None: the optimizer's lr
        **kwargs: Any,
    ) -> None:
        """
        Args:
            probe_epochs: length of stage `probe`; `finetune` runs until max_epochs.
            probe_lr: learning rate of the probe.
            finetune_lr: learning rate of the fine-tuning stage (default: the optimizer's).
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        text = super().class_embeddings(self.hparams.classnames, self.hparams.templates)  # (C, D) zero-shot
        self.head = nn.Parameter(text.detach().clone())  # W
        self.register_buffer("zeroshot_head", text.detach().clone())  # W's θ_zs for the ensemble

    @property
    def stages(self) -> tuple[Stage, ...]:
        hp = self.hparams
        return (Stage("probe", hp.probe_epochs, hp.probe_lr), Stage("finetune", -1, hp.finetune_lr))

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        yield self.head
        if stage == "finetune":
            yield from super().trainable(stage)

    def ensembled_head(self) -> Tensor:
        """(C, D) α·W + (1 − α)·W_zs, the head of the WiSE ensemble (W itself when α = 1)."""
        return weight_ensemble({"head": self.head}, {"head": self.zeroshot_head}, self.hparams.wise_alpha)["head"]

    def class_embeddings(self, classnames: list[str], templates: list[str]) -> Tensor:
        rows = self.head_rows(self.ensembled_head() if self.ensembling() else self.head, classnames)
        return rows if rows is not None else super().class_embeddings(classnames, templates)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The open_clip state dict of `FT.export_state_dict` plus `head`: the (C, D) unit rows of the classifier.

        logits = s · f̂(x) · headᵀ over the training classes. `clipadapt export` writes `head` into the extras
        file beside the weights.
        """
        head = self.head_rows(self.ensembled_head().detach(), self.hparams.classnames)
        return super().export_state_dict() | {"head": head}


class WiSEFT(FT):
    """FT, evaluated and exported as the weight-space ensemble with zero-shot CLIP (α = 0.5 by default)."""

    def __init__(self, *args: Any, wise_alpha: float = 0.5, **kwargs: Any) -> None:
        """
        Args:
            wise_alpha: α of θ = α·θ_ft + (1 − α)·θ_zs (WiSE-FT's default mixing coefficient, 0.5).
        """
        super().__init__(*args, wise_alpha=wise_alpha, **kwargs)
