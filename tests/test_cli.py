"""Every shipped config runs through the real CLI on the tiny model; bad input fails clearly."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from doubles import one_line_error

from clipadapt import checkpoints
from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.readers import resolve_dataset

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs" / "tiny.yaml")]
OVERLAYS = {"tiny.yaml", "toy.yaml"}  # added to a config, not runs of their own
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml") if p.name not in OVERLAYS)
# The paper's schedule does not fit the tiny model trained 2 epochs (T_target=128 of its 64 prompt tokens;
# n_k=80 steps): a budget and schedule that prune within them, so the run exercises the pruning.
TINY_FLAGS = {
    "adapt_fewshot": ["--model.init_args.target_length", "48", "--model.init_args.prune_after_epochs", "0"]
    + ["--model.init_args.accumulate_steps", "1"],
}


def needed_datasets(config: dict) -> set[str]:
    data = config.get("data", {})
    sets = [s for s in data.get("eval_sets") or [] if s not in ("all", "base", "novel")]
    return {data["dataset"], *sets}


def run_dirs(root: Path) -> list[Path]:
    return sorted((root / "lightning_logs").glob("version_*"))


def is_test_only(spec: dict) -> bool:
    """Zero-shot CLIP, training-free Tip-Adapter, TPT and test-time training have nothing to fit: `clipadapt test`."""
    return spec["model"]["class_path"].endswith(("ZeroShotCLIP", "TipAdapter", "TPT")) or (
        spec["model"]["init_args"].get("setting") == "ttt"
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_through_the_cli(config: Path, tmp_path: Path):
    spec = yaml.safe_load(config.read_text())
    for name in needed_datasets(spec):
        write_synthetic(tmp_path / "data", resolve_dataset(name))
    test_only = is_test_only(spec)
    main(
        ["test" if test_only else "fit"]
        + ["--config", str(config), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.root", str(tmp_path / "data"), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--trainer.default_root_dir", str(tmp_path), *TINY_FLAGS.get(config.stem, [])]
    )
    (run,) = run_dirs(tmp_path)
    metrics = yaml.safe_load((run / "test_metrics.json").read_text())
    assert any(k.endswith("/acc") for k in metrics)
    assert all(0 <= v <= 100 for k, v in metrics.items() if k.endswith("acc") or k == "test/hm")
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    if not test_only:
        (ckpt,) = run.glob("checkpoints/*.ckpt")
        assert (run / "config.yaml").exists()
        assert checkpoints.read_checkpoint(ckpt)  # every method's checkpoint loads with weights_only=True
        main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "exported.pt")])
        assert open_clip.create_model("clipadapt-tiny", pretrained=str(tmp_path / "exported.pt"))  # as printed


def test_unknown_config_key_is_named(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(REPO / "configs" / "synthetic_probe.yaml"), "--data.no_such_key", "1"])
    assert "no_such_key" in capsys.readouterr().err


def test_unknown_dataset_lists_the_valid_names(tmp_path: Path):
    with pytest.raises(SystemExit, match="oxford_pets"):
        main(
            ["fit", "--config", str(REPO / "configs" / "synthetic_probe.yaml"), "--data.dataset", "petz"]
            + ["--data.root", str(tmp_path), "--trainer.default_root_dir", str(tmp_path)]
        )


def test_missing_split_file_names_it(tmp_path: Path):
    (tmp_path / "dtd").mkdir()
    with pytest.raises(SystemExit, match="split_zhou_DescribableTextures.json"):
        main(
            [
                "fit",
                "--config",
                str(REPO / "configs" / "synthetic_probe.yaml"),
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


# ---- bad input ends in one line naming the problem and the fix (issue 10 §4) ----


def test_export_of_a_missing_or_foreign_file_is_one_line(tmp_path: Path):
    (tmp_path / "random.ckpt").write_bytes(bytes(range(256)) * 4)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")  # a torch file, but not a clipadapt checkpoint
    out = ["--out", str(tmp_path / "out.pt")]
    assert "does not exist" in one_line_error(["export", "--ckpt", str(tmp_path / "missing.ckpt"), *out])
    assert "not a PyTorch checkpoint" in one_line_error(["export", "--ckpt", str(tmp_path / "random.ckpt"), *out])
    assert "not a checkpoint written by" in one_line_error(["export", "--ckpt", str(tmp_path / "foreign.ckpt"), *out])


def test_ckpt_path_of_random_bytes_or_a_missing_file_is_one_line(tmp_path: Path):
    (tmp_path / "random.ckpt").write_bytes(bytes(range(256)) * 4)
    demo = ["--config", str(REPO / "configs" / "synthetic_probe.yaml"), "--trainer.default_root_dir", str(tmp_path)]
    for command in ("fit", "test"):
        message = one_line_error([command, *demo, "--ckpt_path", str(tmp_path / "random.ckpt")])
        assert "random.ckpt is not a PyTorch checkpoint" in message
        assert "missing.ckpt does not exist" in one_line_error(
            [command, *demo, "--ckpt_path", str(tmp_path / "missing.ckpt")]
        )


def test_default_root_dir_that_is_a_file_is_one_line(data_root: Path, tmp_path: Path):
    (tmp_path / "runs").write_text("not a folder")
    for root in ("runs", "runs/sub"):
        message = one_line_error(
            ["fit", "--config", str(REPO / "configs" / "synthetic_probe.yaml"), "--data.root", str(data_root)]
            + ["--data.dataset", "oxford_pets", "--trainer.default_root_dir", str(tmp_path / root)]
        )
        assert f"{tmp_path / 'runs'} is a file" in message


def test_report_skips_a_corrupt_metrics_file_names_it_and_reports_the_rest(tmp_path: Path, capsys):
    for version, metrics in [(0, '{"test/oxford_pets/acc": 75.0}'), (1, '{"test/oxford_pets/acc": 7')]:
        run = tmp_path / "lightning_logs" / f"version_{version}"
        run.mkdir(parents=True)
        config = {"model": {"class_path": "clipadapt.methods.LinearProbe"}, "data": {"dataset": "oxford_pets"}}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run / "test_metrics.json").write_text(metrics)
    message = one_line_error(["report", str(tmp_path)])
    assert "1 run(s) left out" in message
    out, err = capsys.readouterr()
    assert "75.0" in out and "1 runs" in out  # the good run is reported
    assert f"skipped {tmp_path / 'lightning_logs' / 'version_1' / 'test_metrics.json'}: JSONDecodeError" in err


# ---- what users look at (issue 10 §6) ----


def test_help_lists_every_subcommand_without_importing_torch():
    check = (
        "import sys; from clipadapt.cli import main; main(['--help']); "
        "heavy = {'torch', 'lightning', 'open_clip'} & set(sys.modules); assert not heavy, heavy"
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, check=True).stdout
    for command in ("fit", "validate", "test", "predict", "data", "export", "sweep", "report"):
        assert f"\n  {command} " in out, out
    assert subprocess.run([sys.executable, "-m", "clipadapt.cli"], capture_output=True, env=env).returncode == 2


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    events = EventMultiplexer().AddRunsFromDirectory(str(run))
    events.Reload()
    (name,) = events.Runs()
    return {tag: [(e.step, e.value) for e in events.Scalars(name, tag)] for tag in events.Runs()[name]["scalars"]}


def test_tensorboard_has_lr_loss_and_the_test_metric_and_image_size_follows_the_model(data_root: Path, tmp_path: Path):
    main(
        ["fit", "--config", str(REPO / "configs" / "linear_probe_fewshot.yaml"), *TINY, "--data.root", str(data_root)]
        + ["--data.image_size", "null", "--trainer.max_epochs", "2", "--trainer.default_root_dir", str(tmp_path)]
    )
    (run,) = run_dirs(tmp_path)
    tags = scalars(run)
    metrics = json.loads((run / "test_metrics.json").read_text())
    steps = checkpoints.read_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]  # epoch 1's, the last
    # every step, though an epoch has 3 (at Lightning's log_every_n_steps=50 a few-shot run logs no loss at all)
    assert len(tags["train/loss"]) == steps and any(tag.startswith("lr-") for tag in tags)
    assert tags["hp_metric"][-1] == (steps, pytest.approx(metrics["test/oxford_pets/acc"]))  # not -1
    assert "test/oxford_pets/acc" in tags  # the test after fit is in the fit's run
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"] is None  # 32 px came from the model


def test_an_image_size_the_model_does_not_take_is_refused_before_training(data_root: Path, tmp_path: Path):
    message = one_line_error(
        ["fit", "--config", str(REPO / "configs" / "linear_probe_fewshot.yaml"), *TINY, "--data.root", str(data_root)]
        + ["--data.image_size", "224", "--trainer.default_root_dir", str(tmp_path)]
    )
    assert "data.image_size=224 but clipadapt-tiny takes 32 px images" in message
