"""PromptSRC: deep independent V-L prompts regularized towards the frozen model, aggregated over epochs.

Paper: Khattak, Wasim, Naseer, Khan, Yang, Khan, "Self-regulating Prompts: Foundational Model
Adaptation without Forgetting", ICCV 2023, arXiv 2307.06948. Public code: muzairkhattak/PromptSRC
`trainers/promptsrc.py` (notes: shared/reference/ref_rada_promptsrc.md, Part 2).

Prompts (IVLP): M_t text tokens after SOT (from "a photo of a") and M_v image tokens before ln_pre,
each replaced by new learned tokens in blocks 0 < j < J (N(0, 0.02²)), CLIP frozen. Loss:

    L = CE(s·f̂ŵᵀ, y) + λ1·mean|f̂ − f̂₀| + λ2·mean|ŵ − ŵ₀| + λ3·KL(p₀ ‖ p)/(B·C)

f̂₀: the frozen image tower (no prompts) on the same batch; ŵ₀: textual diversity, the mean of the
*unnormalized* frozen features over the 60 templates, normalized once; p₀ = softmax(s·f̂₀ŵ₀ᵀ). The
terms are `clipadapt.losses.self_consistency_losses`, over the same L1 and KL as CLIP-AST.

Gaussian prompt aggregation (GPA): after epoch e = 1..E the prompts θ_e are added with weight
w_e ∝ N(e; μ, σ²) (`gaussian_epoch_weights`, normalized over the E epochs of the run); after the last
epoch the prompts become Σ_e w_e θ_e, which is what is tested and checkpointed.

Paper settings (configs/promptsrc_*.yaml): M_t = M_v = 4, J = 9, λ = 10 / 25 / 1, SGD lr 0.0025, batch 4,
cosine, 1 warmup epoch at 1e-5; base-to-novel 20 epochs, GPA μ = 15, σ = 1; few-shot 50 epochs,
μ = σ = 30 (ImageNet, Caltech101, Pets, Food101, UCF101, SUN397) or μ = 45, σ = 5 (Cars, Flowers,
Aircraft, DTD, EuroSAT); cross-dataset / domain generalization J = 3, 20 epochs, μ = 6, σ = 10.

Decisions: GPA aggregates the prompts only (the public code sums the whole state dict, whose frozen
part is unchanged by weights summing to 1); its running sum is method state, so a resumed run keeps
it. A run that stops before its last epoch keeps the last prompts. The frozen image features come
from the same tower without prompts (no second copy); ŵ₀ is recomputed when needed (frozen weights).
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from clipadapt.data.templates import PROMPTSRC_TEMPLATES
from clipadapt.losses import self_consistency_losses
from clipadapt.methods.prompting.deep import DeepPromptLearner
from clipadapt.models.context import TextContext, VLPrompts, fit_depth, init_context


def gaussian_epoch_weights(epochs: int, mean: float, std: float) -> list[float]:
    """GPA weights w_e ∝ exp(−(e − μ)² / 2σ²) for e = 1..E, summing to 1 (in log space: far tails never underflow)."""
    if epochs < 1 or std <= 0:
        raise ValueError(f"GPA needs epochs >= 1 and std > 0, got {epochs}, {std}")
    logs = [-0.5 * ((e - mean) / std) ** 2 for e in range(1, epochs + 1)]
    top = max(logs)
    weights = [math.exp(v - top) for v in logs]
    return [w / sum(weights) for w in weights]


class PromptSRC(DeepPromptLearner):
    """Independent deep V-L prompts + self-consistency to frozen CLIP + Gaussian aggregation over epochs."""

    def __init__(
        self,
        classnames: list[str],
        templates: list[str],
        n_ctx_text: int = 4,  # M_t
        n_ctx_image: int = 4,  # M_v
        context_init: str | None = "a photo of a",
        text_depth: int = 9,  # J_t
        image_depth: int = 9,  # J_v
        image_consistency_weight: float = 10.0,  # λ1
        text_consistency_weight: float = 25.0,  # λ2
        logit_consistency_weight: float = 1.0,  # λ3
        gpa: bool = True,
        gpa_mean: float = 15.0,  # μ
        gpa_std: float = 1.0,  # σ
        init_std: float = 0.02,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            n_ctx_text: M_t, text prompt tokens per block.
            n_ctx_image: M_v, image prompt tokens per block.
            context_init: words whose first M_t token embeddings start the text context; None: random.
            text_depth: J_t, text blocks with prompts (capped at the model's blocks).
            image_depth: J_v, image blocks with prompts (capped likewise).
            image_consistency_weight: λ1, L1 between prompted and frozen image features.
            text_consistency_weight: λ2, L1 between prompted and 60-template frozen text features.
            logit_consistency_weight: λ3, KL from the frozen model's class distribution.
            gpa: aggregate the prompts over epochs with Gaussian weights (else keep the last).
            gpa_mean: μ of the GPA weights, in epochs (1-based).
            gpa_std: σ of the GPA weights.
            init_std: std of the random prompt init.
            **kwargs: the AdaptationModule options (arch, pretrained, optimizer, warmup, ...).
        """
        super().__init__(classnames, templates, **kwargs)
        context = TextContext(init_context(self.clip, n_ctx_text, context_init, None, init_std))
        self.vl_prompts = VLPrompts(
            context,
            fit_depth(self.clip, text_depth, "text"),
            fit_depth(self.clip, image_depth, "image"),
            self.clip.width_image,
            image_length=n_ctx_image,
            std=init_std,
        )
        self._teacher_text: Tensor | None = None  # (C, D) ŵ₀
        self._gpa: dict[str, Tensor] | None = None  # Σ_e w_e θ_e so far

    # ---- losses ----

    def training_losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        hp = self.hparams
        text = self.class_embeddings(hp.classnames, hp.templates)  # (C, D), with grad
        image = self.encode_prompted_images(images)  # (B, D)
        scale = self.clip.logit_scale.exp()
        logits = scale * image @ text.T  # (B, C)
        teacher_image = None
        if hp.image_consistency_weight or hp.logit_consistency_weight:
            with torch.no_grad():
                teacher_image = self.image_features(images)  # (B, D), the frozen tower without prompts
        weights = (hp.image_consistency_weight, hp.text_consistency_weight, hp.logit_consistency_weight)
        teacher_text = self.teacher_text().to(text.device)  # (C, D)
        return {
            "ce": F.cross_entropy(logits, labels),
            **self_consistency_losses(image, text, logits, teacher_image, teacher_text, scale, weights),
        }

    def teacher_text(self) -> Tensor:
        """(C, D) ŵ₀: frozen text features of the training classes, mean over the 60 templates, normalized once."""
        if self._teacher_text is None:
            with torch.no_grad():
                self._teacher_text = self.clip.text_features(
                    self.hparams.classnames, PROMPTSRC_TEMPLATES, normalize_each=False
                ).float()
        return self._teacher_text

    def on_fit_start(self) -> None:
        self.teacher_text()  # once, in fp32, before the first (autocast) step

    # ---- Gaussian prompt aggregation ----

    def on_train_epoch_end(self) -> None:
        if not self.hparams.gpa:
            return
        epochs = self.trainer.max_epochs
        weight = gaussian_epoch_weights(epochs, self.hparams.gpa_mean, self.hparams.gpa_std)[self.current_epoch]
        params = dict(self.vl_prompts.named_parameters())
        if self._gpa is None:
            self._gpa = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        for name, p in params.items():
            self._gpa[name] = self._gpa[name].to(p.device) + weight * p.detach().float()
        if self.current_epoch == epochs - 1:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(self._gpa[name])
            rank_zero_info(f"clipadapt: PromptSRC prompts = Gaussian aggregate of {epochs} epochs")

    def method_state(self) -> dict[str, Any]:
        return {"gpa": None if self._gpa is None else {k: v.detach().cpu() for k, v in self._gpa.items()}}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self._gpa = state.get("gpa")
