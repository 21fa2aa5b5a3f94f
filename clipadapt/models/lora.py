"""LowRankQKV: LoRA factors for the fused q/k/v projection of every attention block of CLIP's towers.

Zanella, Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPR Workshops 2024,
arXiv 2405.18541 (CLIP-LoRA). For block l of a tower and j ∈ {q, k, v}:

    W_j ← W_j + s · B_j A_j,   A_j (r, W), B_j (W, r),   s = α / √r

A_j starts as nn.Linear's init (kaiming-uniform, a = √5: U(±1/√W)), B_j at zero, so an untrained
LoRA is the pretrained model. The delta reaches the model two ways:

- merged (`merged_weights`): open_clip's fused `in_proj_weight` (3W, W) = [W_q; W_k; W_v] plus
  s·[B_q A_q; B_k A_k; B_v A_v], run through the unchanged block (`models.weights.call_with_weights`).
  This is what evaluation and export use; with B = 0 it is bit-identical to the pretrained model.
- as a branch (`qkv_delta`): [q | k | v] += s · drop_j(h) A_jᵀ B_jᵀ on the block's LN1 output h, the
  backbone's `lora=` seam. Needed in training because CLIP-LoRA drops out the LoRA input only (p = 0.25),
  independently for q, k and v (one LoRA linear layer each), which no merged weight can express.

Deliberate choices: s = α/√r is CLIP-LoRA's loralib scaling (original LoRA: α/r); the factors of all
blocks of a tower are stacked in one tensor per tower, (L, 3, r, W) and (L, 3, W, r).
"""

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clipadapt.models.backbone import CLIPBackbone

TOWERS = ("image", "text")


class LowRankQKV(nn.Module):
    """Rank-r LoRA on W_q, W_k, W_v of every block of the chosen towers; a `QKVDeltas` for the backbone."""

    def __init__(
        self, shapes: dict[str, tuple[int, int]], rank: int = 2, alpha: float = 1.0, dropout: float = 0.25
    ) -> None:
        """`shapes`: tower -> (blocks, width) for each tower that gets LoRA ("image", "text")."""
        super().__init__()
        if rank < 1 or not 0.0 <= dropout < 1.0 or not shapes or not set(shapes) <= set(TOWERS):
            raise ValueError(f"LoRA needs rank >= 1, dropout in [0, 1) and towers from {TOWERS}, got {rank}, {dropout}")
        self.scale = alpha / math.sqrt(rank)  # s
        self.dropout = dropout
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for tower, (blocks, width) in shapes.items():
            bound = 1 / math.sqrt(width)  # = kaiming_uniform_(a=√5) of an (r, W) matrix (nn.Linear, loralib)
            self.a[tower] = nn.Parameter(torch.empty(blocks, 3, rank, width).uniform_(-bound, bound))  # (L, 3, r, W)
            self.b[tower] = nn.Parameter(torch.zeros(blocks, 3, width, rank))  # (L, 3, W, r)

    @classmethod
    def for_backbone(
        cls, clip: CLIPBackbone, towers: tuple[str, ...], rank: int = 2, alpha: float = 1.0, dropout: float = 0.25
    ) -> "LowRankQKV":
        """Factors shaped for every block of `towers` of `clip`."""
        widths = {"image": clip.width_image, "text": clip.width_text}
        return cls({t: (len(clip.blocks(t)), widths[t]) for t in towers}, rank, alpha, dropout)

    @property
    def towers(self) -> tuple[str, ...]:
        """The towers that carry LoRA."""
        return tuple(self.a.keys())

    def weight_delta(self, tower: str) -> Tensor:
        """(L, 3W, W): s·[B_q A_q; B_k A_k; B_v A_v] per block, in in_proj_weight's row order."""
        delta = self.scale * self.b[tower] @ self.a[tower]  # (L, 3, W, W)
        return delta.flatten(1, 2)

    def merged_weights(self, clip: CLIPBackbone) -> dict[str, Tensor]:
        """{name in `clip.model`: in_proj_weight + delta} for every block with LoRA (differentiable in A, B)."""
        merged = {}
        for tower in self.towers:
            for (name, weight), delta in zip(clip.qkv_weights(tower), self.weight_delta(tower), strict=True):
                merged[name] = weight + delta.to(weight.dtype)
        return merged

    def qkv_delta(self, tower: str, layer: int) -> Callable[[Tensor], Tensor] | None:
        """h (B, L, W) -> (B, L, 3W) = s·[drop(h) A_qᵀ B_qᵀ | drop(h) A_kᵀ B_kᵀ | drop(h) A_vᵀ B_vᵀ]; None off LoRA."""
        if tower not in self.a:
            return None
        a, b = self.a[tower][layer], self.b[tower][layer]  # (3, r, W), (3, W, r)

        def delta(h: Tensor) -> Tensor:
            three = h.unsqueeze(-2).expand(*h.shape[:-1], 3, h.shape[-1])  # (B, L, 3, W)
            three = F.dropout(three, self.dropout, self.training)  # one mask per projection, as loralib
            low = torch.einsum("bljw,jrw->bljr", three, a.to(h.dtype))  # (B, L, 3, r)
            return self.scale * torch.einsum("bljr,jvr->bljv", low, b.to(h.dtype)).flatten(2)  # (B, L, 3W)

        return delta
