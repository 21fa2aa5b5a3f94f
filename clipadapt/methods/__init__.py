"""Every method, importable by class path (`clipadapt.methods.<Name>`) from a config."""

from clipadapt.methods.adapt import Adapt
from clipadapt.methods.adapters import CLIPAdapter, TipAdapter, TipAdapterF
from clipadapt.methods.base import AdaptationModule, Stage
from clipadapt.methods.cite import CLIPCITE
from clipadapt.methods.clip_ast import CLIPAST
from clipadapt.methods.finetuning import FT, LPFT, CLIPLoRA, WiSEFT
from clipadapt.methods.prompting import TPT, CoCoOp, CoOp, KgCoOp, MaPLe, PromptSRC
from clipadapt.methods.rada import RAda
from clipadapt.methods.zeroshot import LinearProbe, ZeroShotCLIP

METHODS: dict[str, type[AdaptationModule]] = {
    m.__name__: m
    for m in (
        ZeroShotCLIP,
        LinearProbe,
        CLIPAST,
        Adapt,
        RAda,
        CLIPCITE,
        CoOp,
        CoCoOp,
        KgCoOp,
        MaPLe,
        PromptSRC,
        TPT,
        CLIPAdapter,
        TipAdapter,
        TipAdapterF,
        CLIPLoRA,
        FT,
        LPFT,
        WiSEFT,
    )
}

__all__ = [
    "Adapt",
    "CLIPAST",
    "CLIPAdapter",
    "CLIPCITE",
    "CoCoOp",
    "CoOp",
    "CLIPLoRA",
    "FT",
    "LPFT",
    "METHODS",
    "AdaptationModule",
    "KgCoOp",
    "LinearProbe",
    "MaPLe",
    "PromptSRC",
    "RAda",
    "Stage",
    "TPT",
    "TipAdapter",
    "TipAdapterF",
    "WiSEFT",
    "ZeroShotCLIP",
]
