"""Fine-tuning family: methods that change CLIP's own weights and export a plain open_clip model.

CLIP-LoRA lives here, not with the adapters: its low-rank update merges into the encoder weights
(like FT), whereas CLIP-Adapter and Tip-Adapter add a module on top of frozen features.
"""

from clipadapt.methods.finetuning.ft import FT, LPFT, WiSEFT
from clipadapt.methods.finetuning.lora import CLIPLoRA

__all__ = ["CLIPLoRA", "FT", "LPFT", "WiSEFT"]
