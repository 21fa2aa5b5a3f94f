"""CLIP-Adapter: a bottleneck MLP on the frozen image features, blended with them by a residual ratio.

Gao, Geng, Zhang, Ma, Fang, Zhang, Li, Qiao, "CLIP-Adapter: Better Vision-Language Models with
Feature Adapters", IJCV 2023 (arXiv 2110.04544). With f = f(x) the (unnormalized) image feature
and A(f) = ReLU(W₂ ReLU(W₁ f)), W₁ (D/4, D), W₂ (D, D/4), no biases:

    f* = α·A(f) + (1 − α)·f,   logits = s · normalize(f*) · ŵ_cᵀ        (α = residual ratio, 0.2)

with ŵ_c the frozen text features of the dataset template. Both towers stay frozen; only A trains,
on CE. The visual adapter is the variant the released code trains (`clip_adapter.py`: reduction
4, ratio 0.2); the paper ablates the ratio and its best value differs between datasets: set
`residual_ratio` per dataset.

Decision where the sources are open: the released trainer takes its optimizer from CoOp's Dassl
configs and ships none, so the config uses CoOp's (SGD lr 2e-3, momentum 0.9, weight decay 5e-4,
cosine, one constant warmup epoch at 1e-5, batch 32) with the paper's 200 epochs.
"""

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule


def residual_blend(features: Tensor, adapted: Tensor, ratio: float) -> Tensor:
    """(B, D) unit normalize(α·A(f) + (1 − α)·f) from the features f and the adapter's output A(f)."""
    return F.normalize(ratio * adapted + (1 - ratio) * features, dim=-1)


class CLIPAdapter(AdaptationModule):
    """A residual bottleneck adapter on the frozen image features; the text features are the zero-shot ones."""

    def __init__(self, *args: Any, residual_ratio: float = 0.2, reduction: int = 4, **kwargs: Any) -> None:
        """
        Args:
            residual_ratio: α, the share of the adapted feature in the blend (0: zero-shot CLIP).
            reduction: bottleneck factor of the adapter (D -> D / reduction -> D).
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if not 0.0 <= residual_ratio <= 1.0 or reduction < 1:
            raise ValueError(
                f"residual_ratio must lie in [0, 1] and reduction be >= 1, got {residual_ratio}, {reduction}"
            )
        dim, hidden = self.clip.embed_dim, self.clip.embed_dim // reduction
        self.adapter = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.ReLU()
        )

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return self.adapter.parameters()

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        with torch.no_grad():  # the image tower is frozen: no graph through it
            features = self.image_features(images, normalize=False)  # (B, D)
        blended = residual_blend(features, self.adapter(features), self.hparams.residual_ratio)  # (B, D)
        return self.clip.logits(blended, text)  # scale·blended·ŵᵀ (+ SigLIP's bias)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The frozen open_clip state dict plus `clip_adapter.{0,2}.weight` (the MLP) and `clip_adapter.residual_ratio`.

        `clipadapt export` writes the `clip_adapter.` keys into the extras file beside the weights; the classifier is
        logits = s · residual_blend(f, A(f), α) · ŵᵀ with A = Linear(0) → ReLU → Linear(2) → ReLU.
        """
        adapter = {f"clip_adapter.{k}": v.detach() for k, v in self.adapter.state_dict().items()}
        ratio = torch.tensor(float(self.hparams.residual_ratio))
        return super().export_state_dict() | adapter | {"clip_adapter.residual_ratio": ratio}
