"""KgCoOp: CoOp with the learned class embeddings kept close to the hand-crafted ones.

Paper: Yao, Zhang, Xu, "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization",
CVPR 2023, arXiv 2303.13283. Public code: htyao89/KgCoOp `trainers/kgcoop.py`.

With w_c the (unit) text feature of CoOp's learned prompt and w_c^clip that of the hand-crafted
prompt ("a photo of a {}." and the other CoOp dataset templates; `prompts`), frozen:

    L = L_ce + λ · L_kg,   L_kg = (1/C) Σ_c ‖w_c − w_c^clip‖²,   λ = 8

Paper settings (configs/kgcoop_*.yaml): M = 4 from "a photo of a", SGD lr 0.002, batch 128,
100 epochs, cosine, 1 warmup epoch at 1e-5; 16 shots for base-to-novel and ImageNet, all shots
for few-shot.

Deviations, on purpose: L_kg is the paper's squared distance; the public code adds W·(1 − cos),
which for unit vectors is W/2 · ‖w − w^clip‖², so its W = 8 equals `kg_weight: 4` here. The anchor
uses this project's CoOp template for every dataset (KgCoOp's code writes DTD's as "a photo of a
{}, a type of texture."); `prompts` picks another set.
"""

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from clipadapt.data.templates import templates_for
from clipadapt.losses import knowledge_guided_loss
from clipadapt.methods.prompting.coop import CoOp


class KgCoOp(CoOp):
    """CoOp + λ‖w − w_clip‖² towards the frozen zero-shot text features of the training classes."""

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        n_ctx: int = 4,  # M
        context_init: str | None = "a photo of a",
        kg_weight: float = 8.0,  # λ
        **kwargs: Any,
    ) -> None:
        """
        Args:
            n_ctx: M, context tokens.
            context_init: words whose embeddings start the context (None: random).
            kg_weight: λ of L_kg (the public code's W is 2λ).
            **kwargs: CoOp's options (class_position, class_specific, prompts: the hand-crafted templates).
        """
        super().__init__(classnames, templates, n_ctx=n_ctx, context_init=context_init, **kwargs)
        self._anchor: Tensor | None = None  # (C, D) w^clip of the training classes, frozen

    def anchor(self) -> Tensor:
        """(C, D) zero-shot text features of the training classes with the hand-crafted prompts."""
        if self._anchor is None:
            with torch.no_grad():
                chosen = templates_for(self.hparams.prompts, self.hparams.templates)
                self._anchor = self.clip.text_features(self.hparams.classnames, chosen).float()
        return self._anchor

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        text = self.class_embeddings(self.hparams.classnames, self.hparams.templates)  # (C, D), with grad
        losses = {"ce": F.cross_entropy(self.classify(images, text), labels)}
        if self.hparams.kg_weight:
            losses["kg"] = self.hparams.kg_weight * knowledge_guided_loss(text, self.anchor().to(text.device))
        return losses
