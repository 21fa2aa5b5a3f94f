"""Test doubles and the tiny set-ups that several tests (and their DDP subprocesses) share."""

import json
import os
import signal
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipadapt.data import CLIPDataModule
from clipadapt.data.readers import resolve_dataset
from clipadapt.methods import LinearProbe, Stage

# A CPU trainer that writes and prints nothing unless a test asks for it.
QUIET = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
)


def tiny_datamodule(root: Path | str, cache_dir: Path | str, **overrides: Any) -> CLIPDataModule:
    """The oxford_pets-layout synthetic data at 32 px, loaded in the main process."""
    kwargs = dict(dataset="oxford_pets", num_shots=4, image_size=32, batch_size=4, num_workers=0)
    return CLIPDataModule(root=str(root), cache_dir=str(cache_dir), **(kwargs | overrides))


def epoch_loss(model: nn.Module, datamodule: CLIPDataModule, train_mode: bool = False) -> float:
    """Mean CE over one pass of the training loader with seeded (so repeatable) augmentation, without grad."""
    mode = model.training
    model.train(train_mode)
    torch.manual_seed(0)
    total, count = 0.0, 0
    with torch.no_grad():
        for images, labels in datamodule.train_dataloader():
            total += F.cross_entropy(model(images), labels, reduction="sum").item()
            count += len(labels)
    model.train(mode)
    return total / count


def ddp_trainer(out: Path, **overrides: Any) -> L.Trainer:
    """Two CPU processes under DDP (run from a script: Lightning re-launches it for rank 1)."""
    return L.Trainer(**(QUIET | dict(devices=2, strategy="ddp", default_root_dir=out) | overrides))


class TwoStage(LinearProbe):
    """Test double: stage `probe` trains the head, stage `all` also the image tower at another lr."""

    @property
    def stages(self) -> tuple[Stage, ...]:
        return (Stage("probe", 1), Stage("all", -1, lr=1e-4))

    def trainable(self, stage: str) -> Iterable[nn.Parameter]:
        yield self.head
        if stage == "all":
            yield from (p for _, p in self.clip.image_parameters())


class KillAt(L.Callback):
    """Test double: SIGKILL this process as batch `batch` of epoch `epoch` starts (a real kill: nothing is cleaned up).

    Used from a config (`trainer.callbacks: [{class_path: doubles.KillAt, ...}]`) of a CLI subprocess.
    """

    def __init__(self, epoch: int, batch: int = 0, group: bool = False) -> None:
        self.epoch, self.batch, self.group = epoch, batch, group  # group: every process of the session (DDP ranks)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            if self.group:
                os.killpg(os.getpgid(0), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)


def one_line_error(argv: list[str]) -> str:
    """Run the CLI in-process; assert that it exits with one `clipadapt: error:` line, and return that line."""
    from clipadapt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("clipadapt: error: ") and "\n" not in message, message
    return message


def free_port() -> int:
    """A TCP port nothing listens on now (a fixed one collides with other runs on the same machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- damaged data: what users' roots hold (a class missing from train, a cut-off file, a repeated name) ----


def edit_split(folder: Path, dataset: str, change: Callable[[dict], None]) -> None:
    """Rewrite the split json of a synthetic `dataset` written into `folder` after `change` edited it in place."""
    path = folder / resolve_dataset(dataset).split_file
    split = json.loads(path.read_text())
    change(split)
    path.write_text(json.dumps(split))


def drop_train_class(folder: Path, dataset: str, label: int) -> None:
    """Remove every train entry of class `label` from the split json (its val and test images stay)."""
    edit_split(folder, dataset, lambda split: split.update(train=[e for e in split["train"] if e[1] != label]))


def truncate(path: str | Path) -> None:
    """Cut an image file to half its bytes, as an interrupted copy leaves it: the header parses, the decode fails."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
