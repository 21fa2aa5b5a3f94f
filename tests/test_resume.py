"""Checkpoints and resume users can rely on (issue 10 §5): exact data streams, whole files, kill and resume.

The kill-and-resume tests run the real CLI in a subprocess, SIGKILL it mid-epoch (`doubles.KillAt`),
resume from the `last.ckpt` it left, and compare with an uninterrupted run. Every run here is one
CPU process with one thread, so the arithmetic of the resumed and the uninterrupted run is the same
and the weights must be bit-equal (torch.equal).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from doubles import tiny_datamodule

from clipadapt import checkpoints
from clipadapt.cli import main
from clipadapt.data import write_synthetic
from clipadapt.data.datamodule import EpochSampler, ItemKey, seed_torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs" / "tiny.yaml")]


# ---- the data stream is a function of (seed, epoch, index) ----


def batches(datamodule, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = datamodule.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b, strict=True)
    )


def test_training_batches_follow_seed_and_epoch_only(data_root: Path, tmp_path: Path):
    make = lambda **kw: tiny_datamodule(data_root, tmp_path / "cache", num_shots=2, **kw)  # noqa: E731
    torch.manual_seed(1)
    first = batches(make(), 1)
    torch.manual_seed(2)  # the global RNG plays no part
    assert same(first, batches(make(), 1))
    assert same(first, batches(make(num_workers=2), 1))  # the key travels to the worker with the index
    assert not same(first, batches(make(), 2))  # another epoch: another order and other crops
    assert not same(first, batches(make(seed=2), 1))


def test_the_train_seed_is_the_runs_and_travels_in_checkpoints(data_root: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what seed_everything leaves
    dm = tiny_datamodule(data_root, tmp_path / "cache", num_shots=2, seed=1)
    assert dm.state_dict() == {"train_seed": 7, "next_epoch": 0}
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    resumed = tiny_datamodule(data_root, tmp_path / "cache", num_shots=2, seed=1)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.train_dataloader().sampler.seed == 7


@pytest.mark.parametrize("n", [7, 8])
def test_epoch_sampler_shards_one_order_across_ranks(n: int):
    data = list(range(n))
    ranks = [EpochSampler(data, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for sampler in ranks:
        sampler.set_epoch(4)
    shards = [list(sampler) for sampler in ranks]
    assert all(len(s) == len(ranks[0]) == -(-n // 3) for s in shards)  # equal shards: DDP steps in lockstep
    assert all(isinstance(k, ItemKey) and (k.seed, k.epoch) == (5, 4) for s in shards for k in s)
    merged = [k.index for step in zip(*shards, strict=True) for k in step]
    order = ranks[0].order()
    assert sorted(order) == data and merged[:n] == order  # the whole permutation, once, in order
    alone = EpochSampler(data, seed=5, num_replicas=1, rank=0)
    alone.set_epoch(4)
    assert [k.index for k in alone] == order  # the same order on one device


# ---- whole files ----


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    io, path = checkpoints.AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.arange(4.0)}, path)
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs) -> None:
        f.write(b"PK\x03\x04 half a zip")  # what a full disk leaves: the first bytes of the file
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(4)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    saved = checkpoints.load(path)
    assert saved["epoch"] == 1 and torch.equal(saved["w"], torch.arange(4.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no partial file left behind
    io.save_checkpoint({"epoch": 3, "w": torch.ones(4)}, path)
    assert checkpoints.load(path)["epoch"] == 3


# ---- killed and resumed through the CLI ----


def kill_config(tmp_path: Path, epoch: int, batch: int = 1, group: bool = False) -> list[str]:
    path = tmp_path / f"kill_{epoch}.yaml"
    callback = {"class_path": "doubles.KillAt", "init_args": {"epoch": epoch, "batch": batch, "group": group}}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    return ["--config", str(path)]


def fit_process(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`clipadapt fit ARGS` in a subprocess, in a session of its own (so a KillAt of the group kills only it)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.run(
        [sys.executable, "-m", "clipadapt.cli", "fit", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        start_new_session=True,
        timeout=600,
    )


def killed(args: list[str], tmp_path: Path) -> None:
    """`clipadapt fit ARGS` in a subprocess that SIGKILLs itself (KillAt in ARGS)."""
    run = fit_process(args, tmp_path)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]


def run_folder(root: Path) -> Path:
    (run,) = (root / "lightning_logs").iterdir()  # a resumed run writes into its own folder, no version_1
    return run


def assert_same_weights(a: Path, b: Path) -> None:
    mine, theirs = checkpoints.read_checkpoint(a), checkpoints.read_checkpoint(b)
    assert mine["epoch"] == theirs["epoch"] and mine["global_step"] == theirs["global_step"]
    assert mine["state_dict"].keys() == theirs["state_dict"].keys()
    for name, value in mine["state_dict"].items():
        assert torch.equal(value, theirs["state_dict"][name]), name


def common(tmp_path: Path, root: Path, config: str) -> list[str]:
    write_synthetic(tmp_path / "data", "oxford_pets")
    return ["--config", str(REPO / "configs" / config), *TINY, "--data.root", str(tmp_path / "data")] + [
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--test_after_fit",
        "false",
        "--trainer.check_val_every_n_epoch",
        "100",  # no validation: it shapes nothing here, and costs time
        "--trainer.num_sanity_val_steps",
        "0",
        "--trainer.default_root_dir",
        str(root),
    ]


def test_clip_ast_killed_in_the_probe_and_in_stage_2_ends_as_if_never_killed(tmp_path: Path):
    # 2 probe + 2 selective epochs of 3 steps; killed at the 2nd step of epoch 1 (probe) and of epoch 3 (selective).
    flags = ["--model.init_args.probe_epochs", "2", "--trainer.max_epochs", "2"]
    main(["fit", *common(tmp_path, tmp_path / "ref", "ast_fewshot.yaml"), *flags])
    args = [*common(tmp_path, tmp_path / "kill", "ast_fewshot.yaml"), *flags]
    killed([*args, *kill_config(tmp_path, epoch=1)], tmp_path)
    ckpt = run_folder(tmp_path / "kill") / "checkpoints" / "last.ckpt"
    saved = checkpoints.read_checkpoint(ckpt)
    assert (saved["epoch"], saved["clipadapt"]["stage"], saved["clipadapt"]["method"]["selection"]) == (
        0,
        "probe",
        None,
    )
    killed([*args, *kill_config(tmp_path, epoch=3), "--ckpt_path", str(ckpt)], tmp_path)
    saved = checkpoints.read_checkpoint(ckpt)
    assert (saved["epoch"], saved["clipadapt"]["stage"]) == (2, "selective")
    main(["fit", *args, "--ckpt_path", str(ckpt)])
    ref, run = run_folder(tmp_path / "ref"), run_folder(tmp_path / "kill")
    assert json.loads((run / "selection.json").read_text()) == json.loads((ref / "selection.json").read_text())
    assert_same_weights(run / "checkpoints" / "last.ckpt", ref / "checkpoints" / "last.ckpt")
    assert checkpoints.read_checkpoint(ckpt)["epoch"] == 3


def test_adapt_killed_mid_pruning_ends_with_the_same_masks_and_weights(tmp_path: Path):
    # 3 epochs of 3 steps, a pruning step every 2 optimizer steps: the epoch-0 checkpoint is mid-window.
    flags = ["--model.init_args.target_length", "48", "--model.init_args.prune_after_epochs", "0"]
    flags += ["--model.init_args.accumulate_steps", "2", "--trainer.max_epochs", "3"]
    main(["fit", *common(tmp_path, tmp_path / "ref", "adapt_fewshot.yaml"), *flags])
    # Killed and resumed with loader workers, which fetch the first batches as Lightning builds the loader.
    args = [*common(tmp_path, tmp_path / "kill", "adapt_fewshot.yaml"), *flags, "--data.num_workers", "2"]
    killed([*args, *kill_config(tmp_path, epoch=1)], tmp_path)
    ckpt = run_folder(tmp_path / "kill") / "checkpoints" / "last.ckpt"
    saved = checkpoints.read_checkpoint(ckpt)
    assert saved["epoch"] == 0 and int(saved["state_dict"]["score_steps"]) == 1  # half a window summed
    live = int(sum(m.sum() for n, m in saved["state_dict"].items() if "mask" in n))
    main(["fit", *args, "--ckpt_path", str(ckpt)])
    ref, run = run_folder(tmp_path / "ref"), run_folder(tmp_path / "kill")
    masks = json.loads((run / "masks.json").read_text())
    assert masks == json.loads((ref / "masks.json").read_text())
    assert live > masks["live"] == 48  # killed while pruning, ended at T_target
    assert_same_weights(run / "checkpoints" / "last.ckpt", ref / "checkpoints" / "last.ckpt")


def test_randomness_inside_a_step_is_drawn_from_seed_epoch_and_batch(monkeypatch):
    # CLIP-LoRA's dropout draws from the global RNG: seeded per step, a resumed run draws the same masks.
    from clipadapt.methods import CLIPLoRA

    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    model = CLIPLoRA(["cat", "dog"], ["a photo of a {}."], arch="clipadapt-tiny", pretrained=None)
    model.lora.requires_grad_(False)  # B starts at 0: give the branch a value, so its dropout shows in the loss
    for p in model.lora.parameters():
        p.normal_()
    model.train()
    batch = (torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    model.training_step(batch, 0)  # fills the cache of the (frozen here) text features
    torch.manual_seed(3)
    first = model.training_step(batch, 0)
    torch.manual_seed(4)  # whatever the global RNG held before the step
    assert torch.equal(first, model.training_step(batch, 0))
    assert not torch.equal(first, model.training_step(batch, 1))  # another batch: other dropout masks


def test_seed_torch_draws_as_manual_seed_without_queueing_unused_devices(monkeypatch):
    # torch.manual_seed formats the caller's stack for each lazily seeded device (~0.5 ms per step):
    # with no device in use, seed_torch seeds the CPU generator alone, to the same draws.
    torch.manual_seed(7)
    expected = torch.rand(5)
    queued = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", queued.append)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    seed_torch(7)
    assert torch.equal(torch.rand(5), expected)
    assert queued == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a device in use is seeded too
    seed_torch(8)
    assert queued == [8]


@pytest.mark.slow  # three 2-process runs: make test-slow
def test_ddp_with_loader_workers_killed_and_resumed_ends_as_if_never_killed(tmp_path: Path):
    # 2 CPU ranks x 2 loader workers, 3 epochs of one step per rank; both ranks killed as epoch 2 starts.
    flags = [
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--data.num_workers",
        "2",
        "--trainer.max_epochs",
        "3",
    ]
    ref = fit_process([*common(tmp_path, tmp_path / "ref", "linear_probe_fewshot.yaml"), *flags], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    args = [*common(tmp_path, tmp_path / "kill", "linear_probe_fewshot.yaml"), *flags]
    killed([*args, *kill_config(tmp_path, epoch=2, batch=0, group=True)], tmp_path)
    ckpt = run_folder(tmp_path / "kill") / "checkpoints" / "last.ckpt"
    assert checkpoints.read_checkpoint(ckpt)["epoch"] == 1
    run = fit_process([*args, "--ckpt_path", str(ckpt)], tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert_same_weights(ckpt, run_folder(tmp_path / "ref") / "checkpoints" / "last.ckpt")
