"""Prompt learners over a frozen CLIP: CoOp, CoCoOp, KgCoOp (text context), MaPLe, PromptSRC (deep V-L prompts),
and TPT (a CoOp context tuned per test image).

They enter the backbone through `clipadapt.models.context` (learned text context, deep prompts).
"""

from clipadapt.methods.prompting.cocoop import CoCoOp
from clipadapt.methods.prompting.coop import CoOp
from clipadapt.methods.prompting.kgcoop import KgCoOp
from clipadapt.methods.prompting.maple import MaPLe
from clipadapt.methods.prompting.promptsrc import PromptSRC
from clipadapt.methods.prompting.tpt import TPT

__all__ = ["CoCoOp", "CoOp", "KgCoOp", "MaPLe", "PromptSRC", "TPT"]
