"""Every method, importable by class path (`clipadapt.methods.<Name>`) from a config."""

from clipadapt.methods.base import AdaptationModule, Stage
from clipadapt.methods.zeroshot import LinearProbe, ZeroShotCLIP

METHODS: dict[str, type[AdaptationModule]] = {m.__name__: m for m in (ZeroShotCLIP, LinearProbe)}

__all__ = ["METHODS", "AdaptationModule", "LinearProbe", "Stage", "ZeroShotCLIP"]
