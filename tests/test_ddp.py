"""2-process CPU DDP: exact evaluation (every test image once) and a stage switch that stays in sync."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clipadapt.data import write_synthetic

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def clipadapt(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "clipadapt.cli", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.slow  # two processes: make test-slow
def test_ddp_test_accuracy_equals_one_process(tmp_path: Path):
    # 5 classes x 5 test images = 25: an odd count, which a padding sampler would double-count.
    write_synthetic(tmp_path / "data", "oxford_pets", num_classes=5, test_per_class=5)
    results = {}
    for devices in (1, 2):
        run = tmp_path / f"devices{devices}"
        clipadapt(
            "test",
            *("--config", str(REPO / "configs" / "zeroshot.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")),
            *("--data.root", str(tmp_path / "data"), "--data.eval_batch_size", "4"),
            *("--trainer.devices", str(devices), "--trainer.strategy", "ddp" if devices > 1 else "auto"),
            *("--trainer.default_root_dir", str(run)),
            cwd=tmp_path,
        )
        (metrics,) = run.glob("lightning_logs/version_*/test_metrics.json")
        results[devices] = json.loads(metrics.read_text())
    assert results[1]["test/oxford_pets/count"] == 25
    assert results[2] == results[1]


@pytest.mark.slow  # two processes: make test-slow
def test_ddp_stage_switch_keeps_ranks_in_sync(tmp_path: Path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    subprocess.run(
        [sys.executable, str(HERE / "ddp_fit.py"), str(tmp_path / "data"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    init, rank0, rank1 = (torch.load(tmp_path / f"{n}.pt") for n in ("init", "rank0", "rank1"))
    image_tower = [k for k in init if k.startswith("clip.model.visual.")]
    assert any(not torch.equal(init[k], rank0[k]) for k in image_tower), "stage 2 did not train the image tower"
    assert all(torch.equal(rank0[k], rank1[k]) for k in init), "ranks diverged: gradients were not all-reduced"
