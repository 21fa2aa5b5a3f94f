"""CLIP-CITE: its three losses against hand-computed values, zero-shot start, what trains, the ensemble, DDP.

Run as a script (`python tests/test_cite.py OUT`) it is the 2-process DDP step of the DDP test.
"""

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from doubles import QUIET, ddp_trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule
from clipadapt.losses import alignment_loss, class_contrastive_loss, similarity_distillation_loss
from clipadapt.methods.cite import CLIPCITE, weight_ensemble
from clipadapt.methods.zeroshot import ZeroShotCLIP

HERE = Path(__file__).resolve().parent

# ---- losses ----


def test_alignment_loss_by_hand():
    head = torch.tensor([[1.0, 0.0], [0.0, 3.0]])  # W rows are normalised inside: e0, e1
    images = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # cos with W: [1, 0] and [0, 1]
    labels = torch.tensor([0, 0])
    s = 2.0
    # image 0: -log(e^2 / (e^2 + 1)); image 1: -log(1 / (1 + e^2))
    expected = (math.log(1 + math.exp(-s)) + math.log(1 + math.exp(s))) / 2
    got = alignment_loss(images, head, labels, s)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_class_contrastive_loss_by_hand():
    s, c = 2.0, 1 / math.sqrt(2)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # T_0, T_1
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # I_0 (class 0), I_1 (class 1), I_2 (class 0)
    targets = torch.tensor([0, 1, 0])
    # image→text: softmax over the two class prompts
    i2t = (2 * math.log(1 + math.exp(-s)) + math.log(2)) / 3
    # text→image, one term per (image, class) pair of Eq. 4. Images 0 and 2 (class 0): the only
    # other-class image is 1 (cos 0 with T_0); I_0 is not a negative of I_2 nor the other way round.
    image0, image2 = math.log(1 + math.exp(-s)), math.log(1 + math.exp(-s * c))
    # image 1 (class 1, cos 1 with T_1): negatives I_0 (cos 0) and I_2 (cos c)
    image1 = math.log(1 + math.exp(-s) + math.exp(s * c - s))
    # a mean over the 3 images, so class 0 weighs 2/3 (not the mean of per-class means, 0.5 each)
    expected = (i2t + (image0 + image1 + image2) / 3) / 2
    got = class_contrastive_loss(images, text, targets, s)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_class_contrastive_loss_of_a_one_class_batch_is_zero_with_finite_gradients():
    images = torch.randn(4, 8, requires_grad=True)
    text = torch.randn(1, 8, requires_grad=True)
    loss = class_contrastive_loss(images, text, torch.zeros(4, dtype=torch.long), 100.0)
    loss.backward()
    assert loss.item() == 0.0  # each term is -log(e^a / e^a): nothing to contrast with
    assert torch.isfinite(images.grad).all() and torch.isfinite(text.grad).all()


def test_class_contrastive_loss_with_distinct_classes_is_the_clip_loss():
    # Paper: SCL is FLYP / CLIP's symmetric loss when no class repeats in the batch.
    images, text, s = torch.randn(5, 8), torch.randn(5, 8), 10.0
    logits = s * F.normalize(images, dim=-1) @ F.normalize(text, dim=-1).T
    rows = torch.arange(5)
    clip_loss = (F.cross_entropy(logits, rows) + F.cross_entropy(logits.T, rows)) / 2
    torch.testing.assert_close(class_contrastive_loss(images, text, rows, s), clip_loss)


def test_similarity_distillation_loss_by_hand():
    student = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]], requires_grad=True)  # p = [.5 .5], [.75 .25]
    teacher = torch.tensor([[math.log(3), 0.0], [0.0, 0.0]], requires_grad=True)  # q = [.75 .25], [.5 .5]
    kl_1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # KL(q ‖ p), row 1
    kl_2 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    loss = similarity_distillation_loss(student, teacher)
    assert loss.item() == pytest.approx((kl_1 + kl_2) / 2, rel=1e-6)  # batch mean
    loss.backward()
    assert teacher.grad is None  # the frozen model is a target only


def test_weight_ensemble_is_exact_at_both_ends():
    tuned = {"w": torch.randn(3, 4), "step": torch.tensor(7)}
    zero = {"w": torch.randn(3, 4), "step": torch.tensor(0)}
    assert torch.equal(weight_ensemble(tuned, zero, 0.0)["w"], zero["w"])
    assert torch.equal(weight_ensemble(tuned, zero, 1.0)["w"], tuned["w"])
    torch.testing.assert_close(weight_ensemble(tuned, zero, 0.25)["w"], 0.25 * tuned["w"] + 0.75 * zero["w"])
    assert weight_ensemble(tuned, zero, 0.5)["step"].item() == 7  # integer tensors are not interpolated


# ---- the method on the tiny model ----


def build(data: CLIPDataModule, **kwargs) -> CLIPCITE:
    torch.manual_seed(0)  # the same random init for every model of a test
    adam = {"optimizer": lambda p: torch.optim.AdamW(p, lr=1e-3)}
    return CLIPCITE(classnames=data.classnames, templates=data.templates, **TINY, **(adam | kwargs))


def clip_weights(model: CLIPCITE) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.clip.model.state_dict().items()}


def assert_weights_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


class Snapshot(Callback):
    """The fine-tuned weights at the end of training, just before `on_fit_end` ensembles them."""

    def on_train_end(self, trainer: L.Trainer, module: CLIPCITE) -> None:
        self.weights = clip_weights(module)


@pytest.mark.parametrize("eval_head", ["text", "head"])
def test_before_any_step_the_logits_are_zero_shot_clips(tiny_data, eval_head):
    prompts = "simple"  # W is built from "a photo of a {}.", the `simple` template
    model = build(tiny_data, eval_head=eval_head, prompts=prompts).eval()
    torch.manual_seed(0)
    zero = ZeroShotCLIP(tiny_data.classnames, tiny_data.templates, **TINY, prompts=prompts).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), zero(x), rtol=1e-5, atol=1e-5)


def test_both_towers_and_the_head_get_gradients_and_the_scale_none(tiny_data):
    model = build(tiny_data).requires_grad_(False)
    for p in model.trainable("train"):  # as the base does at fit start
        p.requires_grad_(True)
    images, labels = next(iter(tiny_data.train_dataloader()))
    sum(model.training_losses(images, labels).values()).backward()
    grads = {n: p.grad for n, p in model.clip.model.named_parameters()}
    assert grads.pop("logit_scale") is None and not model.clip.logit_scale.requires_grad
    no_signal = [n for n, g in grads.items() if g is None or not g.abs().sum() > 0]
    assert no_signal == []  # every tensor of both towers, embeddings and projections included
    assert model.head.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.teacher.parameters())


def test_alignment_alone_does_not_reach_the_text_tower(tiny_data):
    model = build(tiny_data, contrastive_weight=0.0, distillation_weight=0.0)
    model.requires_grad_(True)
    images, labels = next(iter(tiny_data.train_dataloader()))
    sum(model.training_losses(images, labels).values()).backward()
    text = [p.grad for _, p in model.clip.text_parameters()]
    assert all(g is None or not g.any() for g in text)
    assert model.head.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_fit_ends_with_the_weight_space_ensemble(tiny_data, cpu_trainer, alpha):
    model = build(tiny_data, ensemble_alpha=alpha)
    zero_shot, scale = clip_weights(model), model.clip.logit_scale.item()
    snapshot = Snapshot()
    cpu_trainer(max_epochs=1, limit_val_batches=0, callbacks=[snapshot]).fit(model, tiny_data)
    tuned = snapshot.weights
    assert not torch.equal(tuned["visual.proj"], zero_shot["visual.proj"])  # fine-tuning moved both towers
    assert not torch.equal(tuned["text_projection"], zero_shot["text_projection"])
    assert model.clip.logit_scale.item() == scale
    expected = {n: alpha * tuned[n] + (1 - alpha) * zero_shot[n] for n in tuned}
    assert_weights_equal(clip_weights(model), expected)
    assert model.weights == "ensembled"


def test_checkpoints_export_test_and_resume_the_ensembled_model(tiny_data, cpu_trainer, tmp_path: Path):
    model = build(tiny_data)
    zero_shot = clip_weights(model)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # one file per epoch
    fast = {"limit_train_batches": 2, "limit_val_batches": 0}
    trainer = cpu_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[checkpoints], **fast)
    trainer.fit(model, tiny_data)
    ensembled = clip_weights(model)
    first, saved = sorted(str(p) for p in (tmp_path / "ckpt").glob("*.ckpt"))  # epoch=0, epoch=1

    torch.manual_seed(123)  # a different random init: the zero-shot weights must come from the checkpoint
    restored = CLIPCITE.load_from_checkpoint(saved)
    assert restored.weights == "finetuned"  # ModelCheckpoint saved before on_fit_end
    assert_weights_equal(restored.export_state_dict(), ensembled)
    exported = tmp_path / "exported.pt"
    main(["export", "--ckpt", saved, "--out", str(exported)])  # rebuilds with pretrained=None, loads the state dict
    assert_weights_equal(torch.load(exported, weights_only=True), ensembled)

    tested = build(tiny_data)
    cpu_trainer().test(tested, tiny_data, ckpt_path=saved)
    assert_weights_equal(clip_weights(tested), ensembled)

    resumed = build(tiny_data)
    cpu_trainer(max_epochs=2, **fast).fit(resumed, tiny_data, ckpt_path=saved)  # nothing left to train
    assert_weights_equal(clip_weights(resumed), ensembled)  # ensembled exactly once

    midway, snapshot = build(tiny_data), Snapshot()
    cpu_trainer(max_epochs=2, callbacks=[snapshot], **fast).fit(midway, tiny_data, ckpt_path=first)
    tuned = snapshot.weights  # the second epoch trained again from the first epoch's checkpoint
    assert_weights_equal(clip_weights(midway), {n: 0.5 * tuned[n] + 0.5 * zero_shot[n] for n in tuned})

    final = tmp_path / "final.ckpt"
    trainer.save_checkpoint(final)
    after = CLIPCITE.load_from_checkpoint(final)
    assert after.weights == "ensembled"
    assert_weights_equal(after.export_state_dict(), ensembled)
    with pytest.raises(RuntimeError, match="ensemble twice"):
        cpu_trainer(max_epochs=3, **fast).fit(build(tiny_data), tiny_data, ckpt_path=final)


def test_bad_options_fail_at_construction(tiny_data):
    with pytest.raises(ValueError, match="eval_head"):
        build(tiny_data, eval_head="logits")
    with pytest.raises(ValueError, match="ensemble_alpha"):
        build(tiny_data, ensemble_alpha=1.5)
    with pytest.raises(ValueError, match="class_template"):
        build(tiny_data, class_template="a photo.")


# ---- DDP: the contrastive batch is the global batch ----


class StepRecord(Callback):
    """The gradients at the one optimizer step (all-reduced under DDP) and the SCL term logged with it."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}
        self.scl = float("nan")

    def on_before_optimizer_step(self, trainer: L.Trainer, module: CLIPCITE, optimizer: Any) -> None:
        self.grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer: L.Trainer, module: CLIPCITE, *args: Any) -> None:
        self.scl = float(trainer.callback_metrics["train/scl"])


def one_step(trainer: L.Trainer, record: StepRecord) -> None:
    """One SGD step of CLIP-CITE over 8 fixed images (4 classes, repeated), split over the trainer's ranks."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 32, 32)
    labels = torch.tensor([0, 0, 1, 2, 1, 0, 3, 3])  # rank 0 gets [0, 1, 1, 3], rank 1 [0, 2, 0, 3]
    loader = DataLoader(TensorDataset(images, labels), batch_size=8 // trainer.world_size)  # no shuffle
    model = CLIPCITE([f"class {i}" for i in range(4)], ["a photo of a {}."], **TINY, optimizer=torch.optim.SGD)
    trainer.fit(model, loader)


@pytest.mark.slow  # two processes: make test-slow
def test_two_processes_with_half_batches_give_the_one_process_gradients(tmp_path: Path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    run = subprocess.run(
        [sys.executable, str(Path(__file__)), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"cite{r}.pt") for r in (0, 1)]
    record = StepRecord()
    one_step(
        L.Trainer(**(QUIET | dict(devices=1, max_epochs=1, default_root_dir=tmp_path, callbacks=[record]))), record
    )
    # SCL over the gathered 8 images is the one-process SCL on each rank; DVA and VLD are per-rank batch
    # means that DDP's gradient mean turns into the mean over 8. Equal up to float32 summation order.
    for rank in ranks:
        assert rank["scl"] == pytest.approx(record.scl, rel=1e-5)
        assert rank["grads"].keys() == record.grads.keys()
        for name, grad in record.grads.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _ddp_main(out: Path) -> None:
    record = StepRecord()
    trainer = ddp_trainer(out, max_epochs=1, callbacks=[record])
    one_step(trainer, record)
    torch.save({"grads": record.grads, "scl": record.scl}, out / f"cite{trainer.global_rank}.pt")


if __name__ == "__main__":
    _ddp_main(Path(sys.argv[1]))
