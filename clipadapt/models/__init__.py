"""Models: the open_clip backbone and the bundled tiny model configs (registered on import)."""

from pathlib import Path

import open_clip

from clipadapt.models.backbone import CLIPBackbone, PretrainedWeightsUnavailableError

# Registers every configs/*.json under its file stem (e.g. `clipadapt-tiny`) as an open_clip model name.
open_clip.add_model_config(Path(__file__).parent / "configs")

__all__ = ["CLIPBackbone", "PretrainedWeightsUnavailableError"]
