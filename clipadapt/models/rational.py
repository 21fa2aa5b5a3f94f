"""Rational adapter: a mask over CLIP's rational matrix, learned by one attention layer over classes.

Paper: Chen, Ahmad, Yao, Liu, Shen, "One Last Attention for Your Vision-Language Model" (RAda),
ICCV 2025, arXiv 2507.15480. The computation follows the public EFT code (khufia/RAda,
`SimpleMultiheadAttention` and `CustomCLIP.forward`), re-implemented from reference notes.

With unit image features f̂ (B, D), unit class rows ŵ (C, D) and s = exp(logit_scale):

    R = f̂ ⊙ ŵ                        (B, C, D)   rational matrix, Σ_d R = cos(f, w_c)
    q_i = Wq_i(Q_i), Q = {√s·f̂, √s·ŵ, s·R};  k = Wk(s·R), v = Wv(s·R)       (H heads of D/H)
    P_i = C · softmax over the whole C×C grid of q_i kᵀ / √(D/H) / t       (B, H, C, C)
    M = ReLU(1 + Wo(merge(mean_i(P_i) v)))        Wo = 0 at init, so M ≡ 1
    logits = s · Σ_d M ⊙ R                        ≡ zero-shot CLIP logits at init

Memory: three maps of B·H·C² floats. The batch is cut into chunks of at most `max_map_elements`
map entries; when one sample is already too big, its query classes are cut too (pass 1: each
map's maximum; pass 2: exp·v and the map's mass, divided last, so equal to the one-shot softmax up
to float rounding). Batch chunks are recomputed in backward (activation checkpointing) when there
is more than one, so training memory follows the chunk, not the batch. The softmax is written as
exp / Σexp with a float32 `sum` rather than `torch.softmax`: over C² = 10⁶ entries the CPU kernel
rounded ~20x worse against a float64 reference. When the whole map fits (the usual case), the image
query, the same for every class, keeps its one distinct row: its C·softmax over the C×C grid of C equal
rows is the softmax over one row, repeated, so it costs B·H·C instead of B·H·C² (exact up to rounding).

Ablation switches (paper Table 4): `queries`, any non-empty subset of image, text, rational;
`mask_net="mlp"`, our reading of "MLP for f_φ": Linear(D, D) → ReLU → Linear(D, D) (zero-init)
applied to s·R row by row, so classes do not interact.
"""

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

QUERIES = ("image", "text", "rational")


class RationalAdapter(nn.Module):
    """Mask network f_φ over the rational matrix; `forward` returns the adapted logits and the mask."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,  # H (public code)
        temperature: float = 1.0,  # t (public code `--temp`)
        queries: Sequence[str] = QUERIES,  # Table 4
        mask_net: str = "attention",  # attention | mlp (Table 4)
        max_map_elements: int = 2**26,  # entries of one (b, H, c, C) attention map chunk
    ) -> None:
        super().__init__()
        if mask_net not in ("attention", "mlp"):
            raise ValueError(f"mask_net must be attention or mlp, got {mask_net!r}")
        if not queries or set(queries) - set(QUERIES) or len(set(queries)) != len(queries):
            raise ValueError(f"queries must be a non-empty subset of {QUERIES} without repeats, got {queries!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.temperature = dim, num_heads, temperature
        self.queries, self.mask_net, self.max_map_elements = tuple(queries), mask_net, max_map_elements
        if mask_net == "attention":
            self.q_proj = nn.ModuleDict({name: nn.Linear(dim, dim) for name in self.queries})
            self.k_proj = nn.Linear(dim, dim)
            self.v_proj = nn.Linear(dim, dim)
        else:
            self.hidden = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.out_proj.weight)  # M ≡ 1 at init: the adapter starts at zero-shot CLIP
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, image: Tensor, text: Tensor, scale: Tensor, checkpoint_chunks: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(B, D) unit image features, (C, D) unit class rows, s -> logits (B, C), mask M (B, C, D).

        `checkpoint_chunks=False` turns off recomputation in backward (needed under torch.func transforms).
        """
        num_classes = text.shape[0]
        per_sample = self.num_heads * num_classes * num_classes
        step = max(1, self.max_map_elements // per_sample)
        if step >= image.shape[0]:
            return self._chunk(image, text, scale)
        logits, masks = [], []
        recompute = checkpoint_chunks and torch.is_grad_enabled()
        for part in image.split(step):
            if recompute:
                out = checkpoint(self._chunk, part, text, scale, use_reentrant=False)
            else:
                out = self._chunk(part, text, scale)
            logits.append(out[0])
            masks.append(out[1])
        return torch.cat(logits), torch.cat(masks)

    def _chunk(self, image: Tensor, text: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        rational = image[:, None, :] * text[None, :, :]  # (B, C, D)
        scaled = scale * rational  # (B, C, D): keys, values and the rational query
        if self.mask_net == "mlp":
            out = self.out_proj(F.relu(self.hidden(scaled)))  # (B, C, D)
        else:
            out = self.out_proj(self._attend(image, text, scale, scaled))  # (B, C, D)
        mask = F.relu(1 + out)  # (B, C, D)
        logits = scale * (mask.float() * rational.float()).sum(-1)  # (B, C)
        return logits, mask

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(-3, -2)  # (..., C, D) -> (..., H, C, D/H)

    def _attend(self, image: Tensor, text: Tensor, scale: Tensor, scaled: Tensor) -> Tensor:
        """Multi-query attention over classes with the C×C-grid softmax; (B, C, D) merged head outputs."""
        batch, num_classes, _ = scaled.shape
        root = scale.sqrt()
        # Image and text queries are projected before being repeated: (B, 1, D) and (1, C, D).
        sources = {"image": (root * image)[:, None, :], "text": (root * text)[None], "rational": scaled}
        projected = {name: self.q_proj[name](sources[name]) for name in self.queries}
        k = self._heads(self.k_proj(scaled))  # (B, H, C, hd)
        v = self._heads(self.v_proj(scaled))  # (B, H, C, hd)
        factor = 1.0 / (math.sqrt(k.shape[-1]) * self.temperature)
        rows = max(1, self.max_map_elements // (batch * self.num_heads * num_classes))
        if rows >= num_classes:  # the whole map fits: one pass, without repeating the image query
            out = self._grid_attention_whole(list(projected.values()), k.transpose(-1, -2), v, factor)
        else:
            queries = [self._heads(q.expand(batch, num_classes, -1)) for q in projected.values()]  # (B, H, C, hd)
            out = self._grid_attention(queries, k.transpose(-1, -2), v, factor, rows)  # (B, H, C, hd)
        return out.transpose(-3, -2).flatten(-2)  # (B, C, D)

    def _grid_attention_whole(self, queries: list[Tensor], kt: Tensor, v: Tensor, factor: float) -> Tensor:
        """mean_i(P_i) · v with whole maps; a query of r < C distinct rows (the image's: one) stays r rows.

        The C×C grid of a query repeated over its C rows is that row C times, so C · softmax over the grid
        is softmax over the row, repeated: P_i = r · softmax over the (r, C) grid of its distinct rows,
        broadcast over the C rows. The softmax is exp / Σexp with a detached shift (its gradient is zero).
        """
        total = 0
        for q in queries:  # (B or 1, 1 or C, D) projected, not yet repeated
            logits = (self._heads(q) @ kt).float() * factor  # (B, H, r, C)
            e = torch.exp(logits - logits.detach().amax((-2, -1), keepdim=True))
            total = total + e * (logits.shape[-2] / e.sum((-2, -1), keepdim=True))  # (B, H, r, C), P_i
        return (total.to(v.dtype) @ v / len(queries)).expand(v.shape)  # (B, H, C, hd); one row: image alone

    def _grid_attention(self, queries: list[Tensor], kt: Tensor, v: Tensor, factor: float, rows: int) -> Tensor:
        """mean_i(C · softmax over the C×C grid of q_i kᵀ·factor) · v, computed `rows` query classes at a time.

        With several row chunks, pass 1 finds each map's maximum (the softmax shift) and pass 2 sums
        exp·v and the map's mass; dividing by the mass last makes the chunks exact to float rounding.
        """
        num_classes = kt.shape[-1]
        spans = [(a, min(a + rows, num_classes)) for a in range(0, num_classes, rows)]
        out = 0
        for q in queries:  # (B, H, C, hd)
            shift = None
            if len(spans) > 1:  # chunk by chunk, so that no full map is ever held
                peaks = [(q[..., a:b, :] @ kt).float().amax((-2, -1)) for a, b in spans]
                shift = torch.stack(peaks, -1).amax(-1)[..., None, None] * factor  # (B, H, 1, 1)
            mass, parts = 0, []
            for a, b in spans:
                logits = (q[..., a:b, :] @ kt).float() * factor  # (B, H, rows, C)
                e = torch.exp(logits - (logits.amax((-2, -1), keepdim=True) if shift is None else shift))
                mass = mass + e.sum((-2, -1), keepdim=True)  # (B, H, 1, 1)
                parts.append(e.to(v.dtype) @ v)  # (B, H, rows, hd)
            out = out + torch.cat(parts, -2) / mass
        return out * (num_classes / len(queries))  # (B, H, C, hd)
