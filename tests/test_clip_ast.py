"""CLIP-AST on the tiny model: stage invariants, restart, split q/k/v masks, resume, DDP, export, CLI ablations."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import TINY
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import clipadapt.methods.clip_ast as clip_ast
from clipadapt.cli import main
from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.data.templates import PROMPTSRC_TEMPLATES
from clipadapt.errors import ClipAdaptError
from clipadapt.losses import consistency_kl, consistency_l1
from clipadapt.methods.base import Stage
from clipadapt.methods.clip_ast import CLIPAST

REPO = Path(__file__).resolve().parents[1]


def build(data: CLIPDataModule, weight_decay: float = 0.1, **kwargs) -> CLIPAST:
    def adamw(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=weight_decay)

    return CLIPAST(data.classnames, data.templates, **TINY, optimizer=adamw, probe_lr=1e-2, **kwargs)


def weights(model: CLIPAST) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.clip.model.named_parameters()}


def selected_params(model: CLIPAST) -> set[str]:
    chosen = set(model.selection["selected"])
    return {u.param for u in model.units if u.name in chosen}


class Snapshots(Callback):
    """Weights at the end of the probe and right after the switch (before any stage-2 step)."""

    def __init__(self) -> None:
        self.probe_end: dict[str, torch.Tensor] = {}
        self.stage2_start: dict[str, torch.Tensor] = {}
        self.stages: set[str] = set()

    def on_train_epoch_end(self, trainer: L.Trainer, module: CLIPAST) -> None:
        if trainer.current_epoch == 0:
            self.probe_end = weights(module)

    def on_train_batch_start(self, trainer: L.Trainer, module: CLIPAST, batch, batch_idx: int) -> None:
        self.stages.add(module.stage)
        if module.stage == "selective" and not self.stage2_start:
            self.stage2_start = weights(module)


# ---- stage 2 invariants ----


def test_stage_two_trains_exactly_the_selection_from_the_pretrained_weights(tiny_data, cpu_trainer, tmp_path):
    model = build(tiny_data)
    init = weights(model)
    teacher = {n: p.detach().clone() for n, p in model.teacher_visual.named_parameters()}
    snaps = Snapshots()
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = cpu_trainer(max_epochs=2, callbacks=[snaps], logger=logger, log_every_n_steps=1)  # + the probe
    trainer.fit(model, tiny_data)

    block = {u.param for u in model.units}
    assert all(not torch.equal(snaps.probe_end[n], init[n]) for n in block), "the probe trains every block tensor"
    assert all(torch.equal(snaps.stage2_start[n], init[n]) for n in init), "stage 2 must start from pretrained"
    final = weights(model)
    chosen = selected_params(model)
    assert len(model.selection["selected"]) == 4 * 6  # 2 blocks x 2 towers x top-6
    assert {n for n in final if not torch.equal(final[n], init[n])} == chosen, "exactly the selection moves"
    (optimizer,) = trainer.optimizers
    names = {id(p): n for n, p in model.clip.model.named_parameters()}
    assert {names[id(p)] for g in optimizer.param_groups for p in g["params"]} == chosen

    # The teacher: frozen, untouched, the pretrained image tower, not in checkpoints.
    assert all(torch.equal(p, teacher[n]) for n, p in model.teacher_visual.named_parameters())
    assert all(torch.equal(teacher[n], init[f"visual.{n}"]) for n in teacher)
    assert not any(p.requires_grad for p in model.teacher_visual.parameters())
    assert not any(k.startswith("teacher_visual.") for k in model.state_dict())

    run = Path(logger.log_dir)
    saved = json.loads((run / "selection.json").read_text())
    assert saved["selected"] == model.selection["selected"] and saved["trainable_params"] > 0
    assert len(saved["scores"]) == len(model.units) and set(saved["grids"]) == {"image", "text"}
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert {"selection/image", "selection/text"} <= set(events.Tags()["images"])
    scalars = set(events.Tags()["scalars"])
    assert {"train/ce", "train/l1_image", "train/l1_text", "train/kl", "train/trainable_params"} <= scalars
    counts = [e.value for e in events.Scalars("train/trainable_params")]
    assert counts[-1] == saved["trainable_params"] < counts[0]


def test_without_restart_stage_two_continues_from_the_probe(tiny_data, cpu_trainer):
    model = build(tiny_data, restart_from_pretrained=False)
    init = weights(model)
    snaps = Snapshots()
    cpu_trainer(max_epochs=1, callbacks=[snaps]).fit(model, tiny_data)
    assert all(torch.equal(snaps.stage2_start[n], snaps.probe_end[n]) for n in init)
    assert any(not torch.equal(snaps.stage2_start[n], init[n]) for n in init)


def test_split_qkv_rows_outside_the_selection_stay_bitwise(tiny_data, cpu_trainer):
    model = build(tiny_data, split_qkv=True, top_k=3, weight_decay=0.5)  # strong decay would move masked rows
    init = weights(model)
    cpu_trainer(max_epochs=2).fit(model, tiny_data)
    final = weights(model)
    assert len(model.units) == 4 * 16
    assert model._masks, "this seed should select some, not all, of q/k/v in some tensor"
    chosen = set(model.selection["selected"])
    for unit in model.units:
        rows = slice(*unit.rows) if unit.rows else slice(None)
        moved = not torch.equal(final[unit.param][rows], init[unit.param][rows])
        if unit.name not in chosen:
            assert not moved, f"{unit.name} is not selected but moved"
        elif not unit.name.endswith("in_proj_bias[k]"):  # softmax ignores the key bias: its gradient is 0
            assert moved, f"{unit.name} is selected but did not move"
    untouched = set(init) - {u.param for u in model.units}
    assert all(torch.equal(final[n], init[n]) for n in untouched)


def test_bitfit_has_no_probe_and_trains_the_biases(tiny_data, cpu_trainer):
    model = build(tiny_data, scheme="bitfit", encoders="image")
    assert model.stages == (Stage("selective"),)
    assert all(n.startswith("visual.") and n.endswith("bias") for n in model.selection["selected"])
    init = weights(model)
    cpu_trainer(max_epochs=1).fit(model, tiny_data)
    moved = {n for n, p in weights(model).items() if not torch.equal(p, init[n])}
    assert moved == selected_params(model) and len(moved) == 2 * 6


def test_a_run_too_short_for_stage_two_or_without_adam_fails_clearly(tiny_data, cpu_trainer):
    with pytest.raises(ClipAdaptError, match="no selective epoch after the probe"):
        cpu_trainer(max_epochs=0).fit(build(tiny_data), tiny_data)
    sgd = CLIPAST(tiny_data.classnames, tiny_data.templates, **TINY, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(TypeError, match="AdamW"):
        cpu_trainer(max_epochs=1).fit(sgd, tiny_data)


class EpochsAndRates(Callback):
    """The stage of every epoch and the learning rate of every selective step."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, module: CLIPAST, batch, batch_idx: int) -> None:
        if batch_idx == 0:  # after the module's own epoch start, which switches the stage
            self.stages.append(module.stage)
        if module.stage == "selective":
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("scheme", ["adaptive", "random", "bitfit"])
def test_max_epochs_counts_the_selective_epochs_of_every_scheme(scheme, tiny_data, cpu_trainer):
    # Paper §4.1: 1 probe epoch + 30 epochs; the controls, which have no probe, train the same 30.
    seen = EpochsAndRates()
    trainer = cpu_trainer(max_epochs=2, limit_val_batches=0, callbacks=[seen])
    trainer.fit(build(tiny_data, scheme=scheme, warmup_epochs=0), tiny_data)
    assert seen.stages == ["probe"] * (scheme == "adaptive") + ["selective", "selective"]
    # 3 steps per epoch: the selective cosine spans exactly its 2 epochs, whatever came before it.
    assert seen.lrs == pytest.approx([1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(6)])
    assert trainer.max_epochs == 2 + (scheme == "adaptive")

    twice = cpu_trainer(max_epochs=2)  # setup runs once per fit: the probe is added once per trainer
    model = build(tiny_data)
    model.trainer = twice
    model.setup("fit")
    model.setup("fit")
    assert twice.max_epochs == 3


def test_random_selection_follows_the_run_seed_unless_one_is_given(tiny_data, monkeypatch):
    picks = {}
    for seed in (1, 2):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))  # what seed_everything(data.seed) leaves
        picks[seed] = build(tiny_data, scheme="random").selection
    assert picks[1]["selected"] != picks[2]["selected"], "seeds 1 and 2 drew the same random control"
    assert (picks[1]["selection_seed"], picks[2]["selection_seed"]) == (1, 2)  # selection.json says which
    assert build(tiny_data, scheme="random", selection_seed=1).selection["selected"] == picks[1]["selected"]


# ---- losses and teacher ----


def test_teacher_text_is_promptsrcs_mean_of_unnormalized_features(tiny_data):
    model = build(tiny_data).eval()
    clip, tokenizer = model.clip.model, open_clip.get_tokenizer("clipadapt-tiny")
    with torch.no_grad():
        feats = [clip.encode_text(tokenizer([t.format(c) for c in tiny_data.classnames])) for t in PROMPTSRC_TEMPLATES]
    expected = F.normalize(torch.stack(feats).mean(0), dim=-1)
    torch.testing.assert_close(model._teacher_features(), expected, rtol=1e-5, atol=1e-5)


def test_stage_two_loss_is_eq_11(tiny_data):
    model = build(tiny_data, scheme="random", image_consistency_weight=2.0, text_consistency_weight=3.0)
    model.stage = "selective"
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = model.training_losses(images, labels)
    clip, tokenizer = model.clip.model, open_clip.get_tokenizer("clipadapt-tiny")
    with torch.no_grad():
        image = F.normalize(clip.encode_image(images), dim=-1)
        text = F.normalize(clip.encode_text(tokenizer([f"a photo of a {c}." for c in tiny_data.classnames])), dim=-1)
        teacher_text = model._teacher_features()
        scale = clip.logit_scale.exp()
        logits, teacher_logits = scale * image @ text.T, scale * image @ teacher_text.T  # teacher = pretrained
    expected = {
        "ce": F.cross_entropy(logits, labels),
        "l1_image": torch.tensor(0.0),
        "l1_text": 3.0 * consistency_l1(text, teacher_text),
        "kl": consistency_kl(logits, teacher_logits),
    }
    assert set(losses) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(losses[key].detach(), value, rtol=1e-4, atol=1e-5)
    model.stage = "probe"
    assert set(model.training_losses(images, labels)) == {"ce"}


def test_zero_weights_drop_the_teacher(tiny_data):
    model = build(tiny_data, image_consistency_weight=0.0, logit_consistency_weight=0.0)
    assert model.teacher_visual is None


# ---- resume, DDP, export ----


def test_resume_from_stage_two_keeps_the_selection_and_skips_the_probe(tiny_data, cpu_trainer, tmp_path, monkeypatch):
    model = build(tiny_data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(model, tiny_data)  # probe + 1
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["clipadapt"]["stage"] == "selective"
    assert saved["clipadapt"]["method"]["selection"] == model.selection
    assert not any(k.startswith("teacher_visual.") for k in saved["state_dict"])

    def no_probe(*args, **kwargs):
        raise AssertionError("the probe's scores were computed again")

    monkeypatch.setattr(clip_ast, "importance_scores", no_probe)
    torch.manual_seed(123)  # another random init: what survives must come from the checkpoint
    resumed = build(tiny_data)
    snaps = Snapshots()
    trainer = cpu_trainer(max_epochs=2, callbacks=[snaps])
    trainer.fit(resumed, tiny_data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert snaps.stages == {"selective"}
    assert resumed.selection == model.selection
    torch.testing.assert_close(resumed._teacher_text, model._teacher_text.cpu(), rtol=0, atol=0)
    names = {id(p): n for n, p in resumed.clip.model.named_parameters()}
    trained = {names[id(p)] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert trained == selected_params(resumed)


DDP_SCRIPT = """
import json, sys
from pathlib import Path
import lightning as L, torch, torch.distributed as dist
import clipadapt.methods.clip_ast as clip_ast
from doubles import ddp_trainer, tiny_datamodule

root, out = Path(sys.argv[1]), Path(sys.argv[2])
scores = clip_ast.importance_scores
def skewed(*args, **kwargs):  # rank 1 ranks upside down: only the broadcast keeps the ranks together
    values = scores(*args, **kwargs)
    return {k: -v for k, v in values.items()} if dist.get_rank() == 1 else values
clip_ast.importance_scores = skewed
make_selection = clip_ast.CLIPAST._make_selection
def recorded(self, values):
    selection = make_selection(self, values)
    (out / f"local{dist.get_rank()}.json").write_text(json.dumps(selection["selected"]))
    return selection
clip_ast.CLIPAST._make_selection = recorded

L.seed_everything(1)
data = tiny_datamodule(root, out)
model = clip_ast.CLIPAST(data.classnames, data.templates, arch="clipadapt-tiny", pretrained=None,
                         optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), probe_lr=1e-2)
trainer = ddp_trainer(out, max_epochs=1)  # + the probe
trainer.fit(model, data)
rank = trainer.global_rank
(out / f"selection{rank}.json").write_text(json.dumps(model.selection["selected"]))
torch.save(model.clip.model.state_dict(), out / f"rank{rank}.pt")
"""


@pytest.mark.slow  # two processes: make test-slow
def test_ddp_ranks_hold_rank_zeros_selection(tmp_path: Path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    script = tmp_path / "ast_ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parent), str(REPO)])}
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "data"), str(tmp_path)], cwd=tmp_path, env=env, check=True
    )
    local0, local1, final0, final1 = (
        json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local0", "local1", "selection0", "selection1")
    )
    assert local0 != local1, "the test needs ranks that would disagree on their own"
    assert final0 == final1 == local0
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_export_loads_in_plain_open_clip_with_the_same_logits(tiny_data, cpu_trainer, tmp_path, capsys):
    model = build(tiny_data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(model, tiny_data)
    out = tmp_path / "tuned.pt"
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out)])
    assert "open_clip.create_model('clipadapt-tiny'" in capsys.readouterr().out

    plain = open_clip.create_model("clipadapt-tiny", pretrained=str(out)).eval()
    model.eval()
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in model.clip.model.parameters())
    images = torch.randn(5, 3, 32, 32)
    tokens = open_clip.get_tokenizer("clipadapt-tiny")([f"a photo of a {c}." for c in tiny_data.classnames])
    with torch.no_grad():
        text = F.normalize(plain.encode_text(tokens), dim=-1)
        expected = plain.logit_scale.exp() * F.normalize(plain.encode_image(images), dim=-1) @ text.T
        got = model(images)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_export_refuses_a_foreign_file(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        main(["export", "--ckpt", str(tmp_path / "x.ckpt"), "--out", str(tmp_path / "y.pt")])


# ---- every ablation flag through the CLI ----


def _no_text(s: dict) -> bool:
    return all(n.startswith("visual.") for n in s["selected"])


def _no_image(s: dict) -> bool:
    return not any(n.startswith("visual.") for n in s["selected"])


ABLATIONS = {
    "bitfit": (["--model.init_args.scheme", "bitfit"], lambda s: all(n.endswith("bias") for n in s["selected"])),
    "random": (
        ["--model.init_args.scheme", "random", "--model.init_args.selection_seed", "3"],
        lambda s: s["scores"] is None,
    ),
    "global": (["--model.init_args.granularity", "global"], lambda s: s["granularity"] == "global"),
    "image": (["--model.init_args.encoders", "image"], _no_text),
    "text": (["--model.init_args.encoders", "text"], _no_image),
    "top_k": (["--model.init_args.top_k", "2"], lambda s: len(s["selected"]) == 4 * 2),
    "raw": (["--model.init_args.importance", "raw"], lambda s: s["importance"] == "raw"),
    "split_qkv": (["--model.init_args.split_qkv", "true"], lambda s: len(s["scores"]) == 4 * 16),
    "no_restart": (["--model.init_args.restart_from_pretrained", "false"], lambda s: len(s["selected"]) == 4 * 6),
    "ce_only": (
        ["--model.init_args.image_consistency_weight", "0", "--model.init_args.text_consistency_weight", "0"]
        + ["--model.init_args.logit_consistency_weight", "0"],
        lambda s: len(s["selected"]) == 4 * 6,
    ),
}


@pytest.mark.parametrize("ablation", list(ABLATIONS))
def test_ablation_flag_runs_through_the_cli(ablation: str, data_root: Path, tmp_path: Path):
    flags, check = ABLATIONS[ablation]
    main(
        ["fit", "--config", str(REPO / "configs" / "ast_fewshot.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.root", str(data_root), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--trainer.default_root_dir", str(tmp_path), "--trainer.max_epochs", "1", *flags]  # 1 selective epoch
    )
    (run,) = sorted((tmp_path / "lightning_logs").glob("version_*"))
    selection = json.loads((run / "selection.json").read_text())
    assert selection["selected"] and check(selection)
    metrics = yaml.safe_load((run / "test_metrics.json").read_text())
    assert 0 <= metrics["test/oxford_pets/acc"] <= 100
