"""Baselines: zero-shot CLIP and a linear probe initialised from it.

Zero-shot CLIP: Radford et al., "Learning Transferable Visual Models From Natural Language
Supervision", ICML 2021 (arXiv 2103.00020). logits = s · cos(f(x), w_c) with
w_c = normalize(mean_t normalize(g(t(c)))) over the chosen template(s).

LinearProbe: a cosine head W (C, D) over the frozen image tower, initialised from the zero-shot
class embeddings (as in LP-FT / WiSE-FT), logits = s · f̂(x) · normalize(W)ᵀ. Only W trains. An
evaluation set with other classes (novel, cross-dataset) has no trained rows: it falls back to
the zero-shot text classifier, so base-to-novel numbers stay defined (`AdaptationModule.head_rows`).
"""

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule


class ZeroShotCLIP(AdaptationModule):
    """Frozen CLIP; `prompts` picks the dataset template, one template or an ensemble."""


class LinearProbe(AdaptationModule):
    """Cosine linear head initialised from text features; the image and text towers stay frozen."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        text = super().class_embeddings(self.hparams.classnames, self.hparams.templates)
        self.head = nn.Parameter(text.detach().clone())  # (C, D)

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        yield self.head

    def class_embeddings(self, classnames: list[str], templates: list[str]) -> Tensor:
        rows = self.head_rows(self.head, classnames)
        return rows if rows is not None else super().class_embeddings(classnames, templates)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The (frozen) open_clip weights and the learned `head` (C, D)."""
        return super().export_state_dict() | {"head": self.head.detach()}
