"""Masked deep key/value prompts for both CLIP towers (Adapt), and their compact export.

Paper: Huang, Pedapati, Chen, Gao, "Adapt: Adaptive Prompt Tuning for Pre-trained Vision-Language
Models" (ICLR 2025 submission, later TMLR). Spec: shared/specs/adapt.md.

Per tower b ∈ {image, text} and block l, prompt tokens P_l ∈ R^{ξ×W} (init N(0, 0.02)) and a boolean
keep-mask M_l ∈ {0,1}^ξ. A block attends with (Eq. 7)

    Q = f_q(LN1(x)),  K = f_k(LN1([P_l[M_l] ; x])),  V = f_v(LN1([P_l[M_l] ; x]))

(`CLIPBackbone._prompted_block`). Deliberate: a pruned token is *dropped* from K/V, never multiplied
by 0 (LN1(0) = β ≠ 0 would still take attention), so its values cannot change any output and it gets
no gradient; a block whose tokens are all pruned runs the frozen backbone's own code path.
"""

from typing import Any

import torch
from torch import Tensor, nn

TOWERS = ("image", "text")


class MaskedPrompts(nn.Module):
    """ξ prompt tokens per block of each tower, with boolean keep-masks (buffers: saved in checkpoints)."""

    def __init__(
        self,
        layers: dict[str, int],
        widths: dict[str, int],
        max_length: int = 16,  # ξ, tokens per block before pruning
        init_std: float = 0.02,
    ) -> None:
        """`layers` / `widths`: blocks and width W per tower ("image", "text")."""
        super().__init__()
        self.towers = tuple(t for t in TOWERS if layers.get(t, 0) > 0)
        self.max_length = max_length
        for tower in self.towers:
            tokens = torch.empty(layers[tower], max_length, widths[tower])  # (L, ξ, W)
            nn.init.normal_(tokens, std=init_std)
            self.register_parameter(tower, nn.Parameter(tokens))
            self.register_buffer(f"{tower}_mask", torch.ones(layers[tower], max_length, dtype=torch.bool))  # (L, ξ)
        # Live-token indices on the CPU, so a forward never waits on the device to read a mask;
        # rebuilt after the masks change (set_masks, load_state_dict).
        self._live_index: dict[str, list[Tensor]] | None = None
        self.register_load_state_dict_post_hook(lambda module, incompatible: module._forget_live_index())

    def tokens(self, tower: str) -> nn.Parameter:
        """(L, ξ, W) all prompt tokens of `tower`, pruned ones included."""
        return getattr(self, tower)

    def mask(self, tower: str) -> Tensor:
        """(L, ξ) keep-mask of `tower`."""
        return getattr(self, f"{tower}_mask")

    def masks(self) -> dict[str, Tensor]:
        """Tower -> (L, ξ) keep-mask."""
        return {tower: self.mask(tower) for tower in self.towers}

    def set_masks(self, masks: dict[str, Tensor]) -> None:
        """Replace the keep-masks in place (so the buffers stay registered and on their device)."""
        for tower, mask in masks.items():
            self.mask(tower).copy_(mask.to(self.mask(tower).device))
        self._forget_live_index()

    def _forget_live_index(self) -> None:
        self._live_index = None

    def kv_tokens(self, tower: str, layer: int) -> Tensor | None:
        """(P, W) live tokens of `tower` at block `layer`; None when the tower has none there."""
        if tower not in self.towers:
            return None
        if self._live_index is None:
            self._live_index = {t: [row.nonzero().flatten() for row in self.mask(t).cpu()] for t in self.towers}
        index = self._live_index[tower][layer]  # (P,) on the CPU
        if not len(index):
            return None
        tokens = self.tokens(tower)[layer]  # (ξ, W)
        return tokens.index_select(0, index.to(tokens.device, non_blocking=True))  # (P, W)

    def live(self) -> int:
        """Total live tokens over both towers."""
        return sum(int(m.sum()) for m in self.masks().values())

    def live_parameters(self) -> int:
        """Trainable parameters that still matter: live tokens times their tower's width."""
        return sum(int(self.mask(t).sum()) * self.tokens(t).shape[-1] for t in self.towers)

    def compact(self) -> "CompactPrompts":
        """A copy holding only the live tokens, as per-block tensors (same outputs, no masks)."""
        return CompactPrompts(
            {
                tower: [
                    tokens[keep].detach().clone()
                    for tokens, keep in zip(self.tokens(tower), self.mask(tower), strict=True)
                ]
                for tower in self.towers
            }
        )


class CompactPrompts(nn.Module):
    """Exported prompts: per tower and block a (P_l, W) tensor of live tokens only (P_l may be 0)."""

    def __init__(self, tokens: dict[str, list[Tensor]]) -> None:
        """`tokens`: tower -> one (P_l, W) tensor per block."""
        super().__init__()
        self.lengths = {tower: [len(t) for t in per_layer] for tower, per_layer in tokens.items()}
        for tower, per_layer in tokens.items():
            for layer, value in enumerate(per_layer):
                self.register_buffer(f"{tower}_{layer}", value)

    def kv_tokens(self, tower: str, layer: int) -> Tensor | None:
        """(P_l, W) tokens of `tower` at block `layer`; None when there are none."""
        if self.lengths.get(tower, [0] * (layer + 1))[layer] == 0:
            return None
        return getattr(self, f"{tower}_{layer}")

    def state(self, prefix: str = "prompts.") -> dict[str, Tensor]:
        """Flat `{prefix}{tower}.{layer}` -> (P_l, W) tensors (what `Adapt.export_state_dict` adds)."""
        return {
            f"{prefix}{tower}.{layer}": getattr(self, f"{tower}_{layer}")
            for tower, lengths in self.lengths.items()
            for layer in range(len(lengths))
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], prefix: str = "prompts.") -> "CompactPrompts":
        """Rebuild from `state()` keys (other keys, e.g. the open_clip weights, are ignored)."""
        tokens: dict[str, dict[int, Tensor]] = {}
        for key, value in state.items():
            if key.startswith(prefix):
                tower, layer = key[len(prefix) :].split(".")
                tokens.setdefault(tower, {})[int(layer)] = value
        return cls({tower: [per[i] for i in sorted(per)] for tower, per in tokens.items()})
