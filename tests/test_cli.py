"""Every shipped config runs through the real CLI on the tiny model; bad input fails clearly."""

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.readers import resolve_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name != "tiny.yaml")


def needed_datasets(config: dict) -> set[str]:
    data = config.get("data", {})
    sets = [s for s in data.get("eval_sets") or [] if s not in ("all", "base", "novel")]
    return {data["dataset"], *sets}


def run_dirs(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_through_the_cli(config: Path, tmp_path: Path):
    spec = yaml.safe_load(config.read_text())
    for name in needed_datasets(spec):
        write_synthetic(tmp_path / "data", resolve_dataset(name))
    # zero-shot CLIP, training-free Tip-Adapter and test-time training have nothing to fit: `clipadapt test`
    test_only = (
        spec["model"]["class_path"].endswith(("ZeroShotCLIP", "TipAdapter"))
        or spec["model"]["init_args"].get("setting") == "ttt"
    )
    main(
        ["test" if test_only else "fit"]
        + ["--config", str(config), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.root", str(tmp_path / "data"), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--trainer.default_root_dir", str(tmp_path)]
    )
    (run,) = run_dirs(tmp_path)
    metrics = yaml.safe_load((run / "test_metrics.json").read_text())
    assert any(k.endswith("/acc") for k in metrics)
    assert all(0 <= v <= 100 for k, v in metrics.items() if k.endswith("acc") or k == "test/hm")
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    if not test_only:
        assert list(run.glob("checkpoints/*.ckpt")), "no checkpoint"
        assert (run / "config.yaml").exists()


def test_unknown_config_key_is_named(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.no_such_key", "1"])
    assert "no_such_key" in capsys.readouterr().err


def test_unknown_dataset_lists_the_valid_names(tmp_path: Path):
    with pytest.raises(SystemExit, match="oxford_pets"):
        main(
            ["fit", "--config", str(REPO / "configs" / "demo.yaml"), "--data.dataset", "petz"]
            + ["--data.root", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
        )


def test_missing_split_file_names_it(tmp_path: Path):
    (tmp_path / "dtd").mkdir()
    with pytest.raises(SystemExit, match="split_zhou_DescribableTextures.json"):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "demo.yaml"),
                "--data.dataset",
                "dtd",
                "--data.root",
                str(tmp_path),
            ]
        )


def test_weights_unavailable_offline_fail_fast_with_the_fix(tmp_path: Path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    start = time.monotonic()
    run = subprocess.run(
        ["clipadapt", "test", "--config", str(REPO / "configs" / "zeroshot.yaml")]
        + ["--data.root", str(tmp_path / "data"), "--trainer.accelerator", "cpu"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        # a port nothing listens on: no download can happen, even on a machine with internet
        env=os.environ | {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")},
        timeout=120,
    )
    assert run.returncode != 0
    assert time.monotonic() - start < 60
    assert "clipadapt: error:" in run.stderr and "local checkpoint file" in run.stderr
    assert "Traceback" not in run.stderr


def test_data_check_prints_classes_and_counts(data_root: Path, tmp_path: Path, capsys):
    main(["data", "check", "--root", str(data_root), "--dataset", "OxfordPets", "--num-shots", "2", "--seed", "1"])
    out = capsys.readouterr().out
    assert "oxford_pets" in out and "train" in out and "test" in out


def test_data_check_on_a_wrong_root_exits_with_the_reason(tmp_path: Path):
    with pytest.raises(SystemExit, match="DATASETS.md|does not exist|not found"):
        main(["data", "check", "--root", str(tmp_path / "nowhere"), "--dataset", "dtd"])


def test_console_script_is_installed():
    out = subprocess.run(["clipadapt", "fit", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--data.num_shots" in out and "--test_after_fit" in out
