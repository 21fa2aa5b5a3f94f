"""Shared fixtures: a synthetic CoOp-layout root and a quiet CPU trainer factory."""

import os

# Tiny shapes run far faster on one thread, above all on a busy 2-core machine; subprocesses
# (DDP ranks, the CLI) inherit the variables.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from doubles import QUIET, tiny_datamodule

from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.toy import write_toy

torch.set_num_threads(1)

TINY = {"arch": "clipadapt-tiny", "pretrained": None}
TOY = {"arch": "clipadapt-toy", "pretrained": "toy"}  # the pretrained toy CLIP shipped in the package


@pytest.fixture(autouse=True)
def _seed(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    # seed_everything (every CLI run) leaves PL_GLOBAL_SEED behind, and seeds default to it: start without.
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic root, shared by the session; datasets are added by `write_synthetic` on demand."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, "oxford_pets")
    return root


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One toy-world root for the session (the demo's sizes); the datamodule writes any other toy domain on first use."""
    root = tmp_path_factory.mktemp("toy")
    write_toy(root, "toy_dusk")
    return root


@pytest.fixture
def tiny_data(data_root: Path, tmp_path: Path) -> CLIPDataModule:
    """oxford_pets layout, 6 classes x 2 shots, 32 px images, base+novel evaluation."""
    return tiny_datamodule(data_root, tmp_path / "cache", num_shots=2, eval_batch_size=8)


@pytest.fixture
def cpu_trainer(tmp_path: Path) -> Callable[..., L.Trainer]:
    def make(**overrides) -> L.Trainer:
        defaults = QUIET | dict(devices=1, default_root_dir=tmp_path)
        return L.Trainer(**(defaults | overrides))

    return make


@pytest.fixture
def encoded(monkeypatch: pytest.MonkeyPatch) -> dict:
    """Images through the image tower so far (`images`) and each call's batch size (`calls`), every `encode_image`."""
    from clipadapt.models import CLIPBackbone

    count: dict = {"images": 0, "calls": []}
    encode = CLIPBackbone.encode_image

    def counted(backbone: CLIPBackbone, images: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        count["images"] += len(images)
        count["calls"].append(len(images))
        return encode(backbone, images, *args, **kwargs)

    monkeypatch.setattr(CLIPBackbone, "encode_image", counted)
    return count
