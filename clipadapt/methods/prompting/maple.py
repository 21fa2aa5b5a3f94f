"""MaPLe: multi-modal prompt learning, deep text prompts coupled into the image tower.

Paper: Khattak, Rasheed, Maaz, Khan, Khan, "MaPLe: Multi-modal Prompt Learning", CVPR 2023,
arXiv 2210.03117. Public code: muzairkhattak/multimodal-prompt-learning `trainers/maple.py`.

Text block 0 gets M context tokens after SOT (from "a photo" for M = 2) and each block 0 < j < J
its own M tokens P_j (N(0, 0.02²)), replacing the previous block's outputs in those slots. The image
tower gets P̃_j = F_j(P_j) with one linear coupler F_j: W_text -> W_image per block (F_0 maps the
context), appended after the patch tokens before ln_pre and replaced likewise; from block J on the
prompts just propagate (`CLIPBackbone`, deep seam). The prompts and couplers train with CE.

Paper settings (configs/maple_*.yaml): M = 2, J = 9 of 12, SGD lr 0.0035, batch 4, 5 epochs, cosine,
1 warmup epoch at 1e-5, 16 shots; cross-dataset / domain generalization: J = 3, lr 0.0026, 2 epochs.
On a model with fewer blocks than J (the 2-block test model) every block is prompted.
"""

from typing import Any

from clipadapt.methods.prompting.deep import DeepPromptLearner
from clipadapt.models.context import TextContext, VLPrompts, fit_depth, init_context


class MaPLe(DeepPromptLearner):
    """Coupled deep vision-language prompts in the first J blocks of both towers; CLIP frozen."""

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        n_ctx: int = 2,  # M
        context_init: str | None = "a photo of a",
        prompt_depth: int = 9,  # J
        init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            n_ctx: M, prompt tokens per block in both towers.
            context_init: words whose first M token embeddings start block 0's text prompts; None: random.
            prompt_depth: J, blocks with prompts in each tower (capped at the model's blocks).
            init_std: std of the random prompt init.
            **kwargs: the AdaptationModule options (arch, pretrained, optimizer, warmup, ...).
        """
        super().__init__(classnames, templates, **kwargs)
        depth = min(fit_depth(self.clip, prompt_depth, "text"), fit_depth(self.clip, prompt_depth, "image"))
        context = TextContext(init_context(self.clip, n_ctx, context_init, None, init_std))
        self.vl_prompts = VLPrompts(context, depth, depth, self.clip.width_image, coupled=True, std=init_std)
