"""Adapter family: modules over the frozen CLIP features (CLIP-Adapter, Tip-Adapter, Tip-Adapter-F)."""

from clipadapt.methods.adapters.clip_adapter import CLIPAdapter
from clipadapt.methods.adapters.tip_adapter import TipAdapter, TipAdapterF

__all__ = ["CLIPAdapter", "TipAdapter", "TipAdapterF"]
