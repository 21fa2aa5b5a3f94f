"""CLIP-LoRA: low-rank adaptation of the q/k/v projections of both towers, fixed settings for every task.

Zanella, Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024,
arXiv 2405.18541. In every block of both encoders W_j ← W_j + s·B_j A_j for j ∈ {q, k, v}
(`models/lora.py`: rank r = 2, α = 1, s = α/√r, dropout 0.25 on the LoRA input); only A and B train,
on CE of s_CLIP·cos(f(x), g(t_c)) with the dataset's single template, the text features recomputed
with the adapted text tower at every step:

    L = CE(100 · f̂_LoRA(x) ĝ_LoRA(t)ᵀ, y)

AdamW (lr 2e-4, weight decay 0.01, betas (0.9, 0.999)), cosine schedule, batch 32, 500·K iterations
for K shots. With K·C training images and batch 32 that is ⌈16000 / C⌉ epochs whatever K is (C
classes): set `trainer.max_epochs` per dataset (configs/clip_lora_fewshot.yaml lists them).

Evaluation and export use the merged weights W + s·BA (dropout is off at test time, so they are the
trained model exactly): `clipadapt export` writes a plain open_clip state dict. Training with dropout
takes the backbone's explicit q/k/v branch; without dropout it trains through the merged weights, except
the text tower under `text_chunk`: a checkpointed chunk is recomputed in backward, after the merged
weights are swapped out again, so it trains through the branch (equal up to rounding).

Deviations, on purpose: the logit scale is CLIP's own exp(logit_scale) (100 for OpenAI weights; the
public code hard-codes 100); the cosine schedule ends at 0 (public code: 1e-6); bf16 autocast from
Lightning instead of fp16 autocast + GradScaler. The template is CoOp's per-dataset one, as in the
public code (its ImageNet list is "a photo of a {}." alone).
"""

from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from clipadapt.methods.base import AdaptationModule
from clipadapt.models.lora import TOWERS, LowRankQKV
from clipadapt.models.weights import call_with_weights

ENCODERS = {"both": TOWERS, "image": ("image",), "text": ("text",)}


class CLIPLoRA(AdaptationModule):
    """LoRA (rank 2) on W_q, W_k, W_v of every block of both towers; merged into plain CLIP for test and export."""

    def __init__(
        self,
        *args: Any,
        rank: int = 2,  # r
        lora_alpha: float = 1.0,  # α; s = α / √r
        lora_dropout: float = 0.25,  # on the LoRA input, training only
        encoders: str = "both",  # both | image | text (the paper's encoder ablation)
        **kwargs: Any,
    ) -> None:
        """
        Args:
            rank: r, the rank of every B·A.
            lora_alpha: α of the scale s = α / √r.
            lora_dropout: dropout on the input of every LoRA branch in training.
            encoders: the towers that get LoRA: both | image | text.
        """
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        if encoders not in ENCODERS:
            raise ValueError(f"encoders must be one of {tuple(ENCODERS)}, got {encoders!r}")
        self.clip.require_native(type(self).__name__, ENCODERS[encoders])  # the q/k/v deltas need the layer loop
        self.lora = LowRankQKV.for_backbone(self.clip, ENCODERS[encoders], rank, lora_alpha, lora_dropout)

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        return self.lora.parameters()

    def text_trainable(self) -> bool:
        return "text" in self.lora.towers and any(p.requires_grad for p in self.lora.parameters())

    def _encode(self, fn: Callable[..., Tensor], tower: str, *args: Any) -> Tensor:
        """`fn(*args)` of the backbone with LoRA: the dropout branch in training, else the merged weights."""
        if tower not in self.lora.towers:
            return fn(*args)  # a tower without LoRA (which may have no layer loop: a ResNet under encoders=text)
        chunked = tower == "text" and self.clip.text_chunk > 0  # recomputed in backward: no swapped weights
        if self.training and (self.lora.dropout > 0 or chunked):
            return fn(*args, lora=self.lora)
        return call_with_weights(self.clip.model, self.lora.merged_weights(self.clip), fn, *args)

    def encode_classes(self, classnames: list[str], templates: list[str]) -> Tensor:
        return self._encode(self.clip.text_features, "text", classnames, templates)

    def classify(self, images: Tensor, text: Tensor) -> Tensor:
        return self.clip.logits(self._encode(self.clip.encode_image, "image", images), text)  # (+ bias: SigLIP)

    def export_state_dict(self) -> dict[str, Tensor]:
        """A plain open_clip state dict with LoRA merged: in_proj_weight = W + s·[B_q A_q; B_k A_k; B_v A_v]."""
        merged = {name: weight.detach() for name, weight in self.lora.merged_weights(self.clip).items()}
        return super().export_state_dict() | merged
