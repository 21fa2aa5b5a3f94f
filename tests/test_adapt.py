"""Adapt on the tiny model: pruning schedule to exactly T_target, resume mid-window, DDP agreement, export.

Run as a script (`python tests/test_adapt.py ROOT OUT`) it is the 2-process DDP fit of the DDP test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from doubles import ddp_trainer, tiny_datamodule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.errors import ClipAdaptError
from clipadapt.methods.adapt import Adapt
from clipadapt.models import CLIPBackbone
from clipadapt.models.prompts import CompactPrompts

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TINY = {"arch": "clipadapt-tiny", "pretrained": None}
# 2 blocks x ξ=4 tokens x 2 towers = 16 tokens; 3 steps per epoch (12 images, batch 4)
PRUNING = dict(max_length=4, target_length=6, prune_per_step=2, accumulate_steps=2, prune_after_epochs=1)


def sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=5e-4)


def make_adapt(data: CLIPDataModule, **overrides: Any) -> Adapt:
    return Adapt(data.classnames, data.templates, **(TINY | PRUNING | {"optimizer": sgd} | overrides))


class Trace(Callback):
    """Seeds every epoch (the data order then does not depend on history) and records live tokens per step."""

    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.masks: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, module: Adapt) -> None:
        torch.manual_seed(100 + trainer.current_epoch)

    def on_train_batch_start(self, trainer: L.Trainer, module: Adapt, batch: Any, batch_idx: int) -> None:
        self.live[trainer.global_step] = module.kv_prompts.live()  # after `global_step` optimizer steps
        self.masks[trainer.global_step] = {t: m.clone() for t, m in module.kv_prompts.masks().items()}


def expected_live(steps: int) -> int:
    """Warmup epoch = 3 steps; then a pruning of r_p=2 after every n_k=2 accumulated steps, down to 6."""
    return max(6, 16 - 2 * (max(0, steps - 3) // 2))


def test_pruning_reaches_target_on_schedule_and_resumes_with_identical_masks(tiny_data, cpu_trainer, tmp_path):
    trace = Trace()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, save_on_train_epoch_end=True)
    logger = TensorBoardLogger(tmp_path, name="logs")
    full = cpu_trainer(
        max_epochs=6, limit_val_batches=0, callbacks=[trace, ckpt], logger=logger, enable_checkpointing=True
    )
    model = make_adapt(tiny_data)
    full.fit(model, tiny_data)

    assert full.global_step == 18
    assert trace.live == {step: expected_live(step) for step in range(18)}
    assert trace.live[13] == 6 and model.kv_prompts.live() == 6, "exactly T_target after the last pruning"
    assert int(model.score_steps) == 0 and all(not s.any() for s in model._scores().values())
    saved = json.loads((Path(logger.log_dir) / "masks.json").read_text())
    assert saved["live"] == 6 and saved["masks"] == {t: m.int().tolist() for t, m in model.kv_prompts.masks().items()}
    assert list(Path(logger.log_dir).glob("events.out.tfevents.*"))

    # After epoch 1 (6 steps) one pruning is done and one step sits in the accumulators: mid-window.
    (epoch1,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")
    state = torch.load(epoch1, weights_only=False)["state_dict"]
    assert (
        int(state["score_steps"]) == 1
        and state["kv_prompts.image_mask"].sum() + state["kv_prompts.text_mask"].sum() == 14
    )
    resumed_trace = Trace()
    resumed = cpu_trainer(max_epochs=6, limit_val_batches=0, callbacks=[resumed_trace])
    again = make_adapt(tiny_data)
    resumed.fit(again, tiny_data, ckpt_path=str(epoch1), weights_only=False)  # hparams hold `sgd`
    assert min(resumed_trace.masks) == 6
    for step, masks in resumed_trace.masks.items():
        assert all(torch.equal(masks[t], trace.masks[step][t]) for t in masks), f"masks differ after step {step}"
    assert all(torch.equal(again.kv_prompts.mask(t), model.kv_prompts.mask(t)) for t in ("image", "text"))


def test_per_branch_budget_and_no_pruning_before_warmup(tiny_data, cpu_trainer):
    class AfterWarmup(Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, module: Adapt) -> None:
            if trainer.current_epoch == 0:
                self.state = (module.kv_prompts.live(), int(module.score_steps), float(module.score_image.sum()))

    warmup = AfterWarmup()
    model = make_adapt(tiny_data, budget="per_branch", text_budget_ratio=0.25, score="l2", accumulate_steps=1)
    cpu_trainer(max_epochs=2, limit_val_batches=0, callbacks=[warmup]).fit(model, tiny_data)
    assert warmup.state == (16, 0, 0.0)  # the warmup epoch scored and pruned nothing
    model = make_adapt(tiny_data, budget="per_branch", text_budget_ratio=0.25, score="grad", prune_after_epochs=0)
    cpu_trainer(max_epochs=6, limit_val_batches=0).fit(model, tiny_data)
    masks = model.kv_prompts.masks()
    assert (int(masks["image"].sum()), int(masks["text"].sum())) == (4, 2)  # round(0.25 · 6) = 2 text tokens


def test_a_target_at_or_above_the_prompt_pool_is_refused(tiny_data, cpu_trainer, tmp_path):
    def fit(**overrides: Any) -> None:
        cpu_trainer(max_epochs=6, limit_val_batches=0).fit(make_adapt(tiny_data, **overrides), tiny_data)

    with pytest.raises(ClipAdaptError, match="at or above the 16 prompt tokens"):  # 2 + 2 blocks x ξ=4
        fit(target_length=16)
    with pytest.raises(ClipAdaptError, match="text tower 9 .* its 8 prompt tokens"):  # round(0.75 · 12) = 9 > 8
        fit(target_length=12, budget="per_branch", text_budget_ratio=0.75)
    fit(target_length=15)

    # Through the CLI: the shipped config's T_target=128 on the tiny model's 2 x 2 x 16 = 64 tokens, one line.
    write_synthetic(tmp_path / "data", "oxford_pets")
    configs = [
        "--config",
        str(REPO / "configs" / "adapt_fewshot.yaml"),
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
    ]
    with pytest.raises(SystemExit, match=r"^clipadapt: error: Adapt: target_length=128 is at or above the 64 prompt"):
        main(
            ["fit", *configs, "--data.root", str(tmp_path / "data"), "--data.cache_dir", str(tmp_path / "cache")]
            + ["--trainer.default_root_dir", str(tmp_path)]
        )


def test_an_unreachable_target_raises_the_rate_or_is_refused(tiny_data, cpu_trainer, tmp_path):
    # 3 epochs: (3 - 1 warmup) x 3 steps // n_k=2 = 3 pruning steps; r_p=2 would leave 16 - 6 = 10 > 6.
    with pytest.raises(ClipAdaptError, match="leave 10 of 16 .* prune_per_step >= 4"):
        cpu_trainer(max_epochs=3, limit_val_batches=0).fit(make_adapt(tiny_data, unreachable="error"), tiny_data)
    with pytest.raises(ClipAdaptError, match="0 pruning steps"):  # the warmup takes every epoch
        cpu_trainer(max_epochs=3, limit_val_batches=0).fit(make_adapt(tiny_data, prune_after_epochs=3), tiny_data)

    model = make_adapt(tiny_data)
    trainer = cpu_trainer(max_epochs=3)
    with pytest.warns(UserWarning, match="leave 10 of 16 .* pruning 4 tokens per step instead"):
        trainer.fit(model, tiny_data)
    assert model.prune_rate == 4 and model.kv_prompts.live() == 6  # ceil(10 / 3) = 4: 4 + 4 + 2
    assert json.loads((tmp_path / "masks.json").read_text())["prune_per_step"] == 4
    trainer.test(model, tiny_data, verbose=False)
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    assert metrics["prompts/live"] == 6 and 0 <= metrics["val/acc"] <= 100


def test_target_epoch_reaches_the_target_early(tiny_data, cpu_trainer):
    trace = Trace()
    model = make_adapt(tiny_data, target_epoch=2)  # 1 pruning step in epoch 2: it must prune all 10
    with pytest.warns(UserWarning, match="pruning 10 tokens per step"):
        cpu_trainer(max_epochs=4, limit_val_batches=0, callbacks=[trace]).fit(model, tiny_data)
    assert trace.live[4] == 16 and trace.live[5] == 6  # the one window (steps 3 and 4) prunes all 10 at once
    assert model.kv_prompts.live() == 6
    with pytest.raises(ClipAdaptError, match="target_epoch=5 is past trainer.max_epochs=4"):
        cpu_trainer(max_epochs=4, limit_val_batches=0).fit(make_adapt(tiny_data, target_epoch=5), tiny_data)


def test_frozen_backbone_and_export_reproduces_the_masked_logits(tiny_data, cpu_trainer):
    model = make_adapt(tiny_data)
    pretrained = {k: v.clone() for k, v in model.clip.state_dict().items()}
    cpu_trainer(max_epochs=5, limit_val_batches=0).fit(model, tiny_data)
    assert all(torch.equal(v, pretrained[k]) for k, v in model.clip.state_dict().items()), "the backbone moved"
    assert model.kv_prompts.live() < 16

    state = model.export_state_dict()
    compact = CompactPrompts.from_state(state)
    assert sum(sum(n) for n in compact.lengths.values()) == model.kv_prompts.live()
    plain = CLIPBackbone("clipadapt-tiny", pretrained=None).eval()  # eval and train MHA kernels differ in the last bit
    plain.model.load_state_dict({k: v for k, v in state.items() if not k.startswith("prompts.")})
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        masked = model(images)
        text = plain.text_features(model.hparams.classnames, ["a photo of a {}."], prompts=compact)
        exported = plain.logit_scale.exp() * plain.encode_image(images, prompts=compact) @ text.T
    # Compact and masked prompts build K/V through different gathers and shapes, so float rounding may
    # differ in the last bit between CPUs (seen on AMD EPYC): equal to fp32 round-off, same predictions.
    torch.testing.assert_close(exported, masked, rtol=1e-5, atol=1e-5)
    assert torch.equal(exported.argmax(-1), masked.argmax(-1))

    with torch.no_grad():  # every token pruned: exactly the frozen zero-shot model
        model.kv_prompts.set_masks({t: torch.zeros_like(m) for t, m in model.kv_prompts.masks().items()})
        text = model.clip.text_features(model.hparams.classnames, ["a photo of a {}."])
        assert torch.equal(model(images), model.clip.logit_scale.exp() * model.clip.encode_image(images) @ text.T)


@pytest.mark.slow  # two processes: make test-slow
def test_two_process_ddp_prunes_identically_on_both_ranks(tmp_path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(REPO)])}
    run = subprocess.run(
        [sys.executable, str(Path(__file__)), str(tmp_path / "data"), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"masks{r}.pt") for r in (0, 1))
    assert sum(int(m.sum()) for m in rank0.values()) == 6, "T_target not reached"
    assert all(torch.equal(rank0[t], rank1[t]) for t in rank0)
    (saved,) = tmp_path.glob("lightning_logs/version_*/masks.json")
    assert json.loads(saved.read_text())["masks"] == {t: m.int().tolist() for t, m in rank0.items()}


def _ddp_main(root: Path, out: Path) -> None:
    L.seed_everything(1)
    data = tiny_datamodule(root, out)
    model = make_adapt(data)
    # 15 steps: T_target at step 13, then training goes on with the pruned masks
    trainer = ddp_trainer(out, max_epochs=5, limit_val_batches=0, logger=True)  # masks.json in its log dir
    trainer.fit(model, data)
    torch.save({t: m.cpu() for t, m in model.kv_prompts.masks().items()}, out / f"masks{trainer.global_rank}.pt")


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]), Path(sys.argv[2]))
