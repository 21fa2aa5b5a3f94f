"""Data layer: CoOp-layout readers, Dassl-exact few-shot draws, base/novel splits, templates, datamodule."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipadapt.data.datamodule import CLIPDataModule, EvalSet
    from clipadapt.data.readers import DATASETS
    from clipadapt.data.synthetic import write_synthetic

__all__ = ["DATASETS", "CLIPDataModule", "EvalSet", "write_synthetic"]

# Resolved on first use, so `python -m clipadapt.data.synthetic` does not import its own module twice
# and `clipadapt.data.templates` can be imported without torchvision.
_HOMES = {
    "CLIPDataModule": "datamodule",
    "EvalSet": "datamodule",
    "DATASETS": "readers",
    "write_synthetic": "synthetic",
}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_HOMES[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
