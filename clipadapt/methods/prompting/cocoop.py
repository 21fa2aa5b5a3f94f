"""CoCoOp: CoOp's context shifted per image by a small meta-network.

Paper: Zhou, Yang, Loy, Liu, "Conditional Prompt Learning for Vision-Language Models", CVPR 2022,
arXiv 2203.05557. Public code: KaiyangZhou/CoOp `trainers/cocoop.py`.

With f̂(x) the unit image feature and the meta-net π = Linear(D, D/16) -> ReLU -> Linear(D/16, W):

    v_m(x) = v_m + π(f̂(x)),   t_c(x) = [SOT] v_1(x) ... v_M(x) [CLASS_c] [.] [EOT]
    p(y = c | x) = exp(s · cos(g(t_c(x)), f̂(x))) / Σ_j exp(s · cos(g(t_j(x)), f̂(x)))

The context and π train with CE. Paper settings (configs/cocoop_*.yaml): M = 4 from "a photo of a",
SGD lr 0.002, batch 1, 10 epochs, cosine, 1 warmup epoch at 1e-5, 16 shots.

Cost: the text tower runs B x C times per batch (train and test), not C times. `class_logits`
builds all B x C prompts of a batch in one gather and encodes them `chunk_size` rows at a time, each
chunk cut after its last EOT; benchmarks/prompting.py measures what batch fits where. Class
features cannot be cached across images, so the base's (C, D) text head is not used.
"""

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule
from clipadapt.models.context import TextContext, init_context


class CoCoOp(AdaptationModule):
    """Learned context + meta-net bias from the image: per-image text features for every class."""

    native_towers = ("text",)  # the learned prompts enter through these towers' layer seams

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        n_ctx: int = 4,  # M
        context_init: str | None = "a photo of a",
        init_std: float = 0.02,
        chunk_size: int = 1000,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            n_ctx: M, context tokens (at most 4 with "a photo of a").
            context_init: words whose token embeddings start the context; None: random N(0, init_std²).
            init_std: std of the random context init.
            chunk_size: prompts (images x classes) per text-tower call.
            **kwargs: the AdaptationModule options (arch, pretrained, optimizer, warmup, ...).
        """
        super().__init__(classnames, templates, **kwargs)
        self.context = TextContext(init_context(self.clip, n_ctx, context_init, None, init_std))
        dim = self.clip.embed_dim
        self.meta_net = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(dim, dim // 16),
                relu=nn.ReLU(),
                linear2=nn.Linear(dim // 16, self.clip.width_text),
            )
        )  # π

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return [self.context.vectors, *self.meta_net.parameters()]

    def text_trainable(self) -> bool:
        return self.context.vectors.requires_grad

    def class_logits(self, images: Tensor, classnames: list[str], templates: list[str]) -> Tensor:
        image = self.image_features(images)  # (B, D), unit; the frozen tower's features of a step's images held once
        context = self.context.vectors + self.meta_net(image)[:, None, None, :]  # (B, 1, M, W)
        text = self.context.features(self.clip, classnames, context=context, chunk_size=self.hparams.chunk_size)
        return self.clip.logit_scale.exp() * torch.einsum("bd,bcd->bc", image.to(text.dtype), text)  # (B, C)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The frozen open_clip weights plus `prompts.context.vectors` (M, W) and the meta-net `prompts.meta_net.*`.

        Plain open_clip ignores them: the per-image context is vectors + meta_net(f̂(x)) (`class_logits`).
        """
        learned = nn.ModuleDict({"context": self.context, "meta_net": self.meta_net})
        return self.clip.model.state_dict() | learned.state_dict(prefix="prompts.")
