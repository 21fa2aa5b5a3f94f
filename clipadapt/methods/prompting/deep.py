"""What MaPLe and PromptSRC share: a frozen CLIP whose towers both run with deep prompts (`VLPrompts`).

The subclass builds `self.vl_prompts` (coupled for MaPLe, independent for PromptSRC) and says its
losses; the prompts are all that trains, the class text is re-encoded while they do.
"""

from collections.abc import Iterable

from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule
from clipadapt.models.context import VLPrompts


class DeepPromptLearner(AdaptationModule):
    """Text and image features through `self.vl_prompts`, set by the subclass's `__init__`."""

    native_towers = ("image", "text")  # the learned prompts enter through these towers' layer seams

    vl_prompts: VLPrompts

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return self.vl_prompts.parameters()

    def text_trainable(self) -> bool:
        return any(p.requires_grad for p in self.vl_prompts.parameters())

    def encode_classes(self, classnames: list[str], templates: list[str]) -> Tensor:
        return self.vl_prompts.context.features(self.clip, classnames, deep=self.vl_prompts.text_tokens())

    def encode_prompted_images(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, D) unit image features with the image prompts."""
        return self.clip.encode_image(images, deep=self.vl_prompts.image_tokens())

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        return self.clip.logit_scale.exp() * self.encode_prompted_images(images) @ text.T  # (B, C)

    def export_state_dict(self) -> dict[str, Tensor]:
        """The frozen open_clip weights plus the prompts (and couplers) under `prompts.`, a `VLPrompts` state.

        Plain open_clip ignores them: pass `image_tokens()` / `text_tokens()` of a rebuilt `VLPrompts`
        as `deep=` to `CLIPBackbone.encode_image` / `TextContext.features`.
        """
        return self.clip.model.state_dict() | self.vl_prompts.state_dict(prefix="prompts.")
