"""CoOp: context optimization, M learned word vectors in front of every class name.

Paper: Zhou, Yang, Loy, Liu, "Learning to Prompt for Vision-Language Models", IJCV 2022,
arXiv 2109.01134. Public code: KaiyangZhou/CoOp `trainers/coop.py`.

The prompt of class c is t_c = [SOT] [V]_1 ... [V]_M [CLASS_c] [.] [EOT] (`class_position` end; middle
and front put the name inside / before the context), and with g the frozen text tower, f the frozen
image tower:

    p(y = c | x) = exp(s · cos(g(t_c), f(x))) / Σ_j exp(s · cos(g(t_j), f(x)))

Only [V] trains, with CE: one (M, W) context shared by every class ("unified"), or one per class
(`class_specific`, CSC). Init: N(0, 0.02²), or the token embeddings of `context_init` ("a photo of a",
then M = 4). Paper settings (configs/coop_*.yaml): SGD lr 0.002, batch 32, cosine, 1 warmup epoch at
1e-5; 200 epochs for 8/16 shots, 100 for 2/4, 50 for 1 shot and for ImageNet; M = 16.

Decision: a class-specific context has no vectors for classes it did not train (novel, another
dataset); those sets are scored with the zero-shot text classifier (`prompts` templates), as the
linear probe does. The text features are re-encoded at every step (the context trains) and once
per evaluation set.
"""

from collections.abc import Iterable
from typing import Any

from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule
from clipadapt.models.context import TextContext, init_context


class CoOp(AdaptationModule):
    """Learned context vectors in the text prompt (unified or class-specific); everything else frozen."""

    native_towers = ("text",)  # the learned prompts enter through these towers' layer seams

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        n_ctx: int = 16,  # M
        context_init: str | None = None,
        class_position: str = "end",
        class_specific: bool = False,
        init_std: float = 0.02,
        prompts: str = "dataset",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            n_ctx: M, context tokens (with `context_init`: at most its token count, e.g. 4 for "a photo of a").
            context_init: words whose token embeddings start the context; None: random N(0, init_std²).
            class_position: end | middle | front, where the class name sits relative to the context.
            class_specific: one context per training class (CSC) instead of one shared by all.
            init_std: std of the random context init.
            prompts: templates of the zero-shot classifier for classes a class-specific context lacks.
            **kwargs: the AdaptationModule options (arch, pretrained, optimizer, warmup, ...).
        """
        super().__init__(classnames, templates, prompts=prompts, **kwargs)
        classes = len(classnames) if class_specific else None
        self.context = TextContext(init_context(self.clip, n_ctx, context_init, classes, init_std), class_position)

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return [self.context.vectors]

    def text_trainable(self) -> bool:
        return self.context.vectors.requires_grad

    def encode_classes(self, classnames: list[str], templates: list[str]) -> Tensor:
        if not self.hparams.class_specific:
            return self.context.features(self.clip, classnames)  # (C, D)
        rows = {name: i for i, name in enumerate(self.hparams.classnames)}
        if not all(name in rows for name in classnames):
            return super().encode_classes(classnames, templates)  # no trained context: zero-shot
        context = self.context.vectors[[rows[name] for name in classnames]]  # (C, M, W)
        return self.context.features(self.clip, classnames, context=context)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The frozen open_clip weights plus `prompts.vectors`, the (M, W) or (C, M, W) learned context.

        Plain open_clip ignores the context: rebuild it with `TextContext(state["prompts.vectors"])`
        and encode with `TextContext.features(backbone, classnames)`.
        """
        return self.clip.model.state_dict() | self.context.state_dict(prefix="prompts.")
