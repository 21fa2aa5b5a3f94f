"""The shared base and the two baselines: zero-shot logits, frozen towers, stages, schedule, resume."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from doubles import TwoStage
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from clipadapt.data import CLIPDataModule
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import LinearProbe, ZeroShotCLIP
from clipadapt.methods.base import harmonic_mean


def build(cls: type, data: CLIPDataModule, **kwargs) -> torch.nn.Module:
    return cls(classnames=data.classnames, templates=data.templates, **TINY, **kwargs).eval()


def images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32)


def test_zero_shot_logits_equal_open_clip(tiny_data):
    model = build(ZeroShotCLIP, tiny_data)
    x = images()
    clip = model.clip.model
    prompts = [tiny_data.templates[0].format(c) for c in tiny_data.classnames]
    with torch.no_grad():
        text = F.normalize(clip.encode_text(model.clip.tokenize(prompts)), dim=-1)
        expected = clip.logit_scale.exp() * F.normalize(clip.encode_image(x), dim=-1) @ text.T
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_text_head_is_cached_while_the_text_tower_is_frozen(tiny_data):
    model = build(ZeroShotCLIP, tiny_data)
    first = model.class_embeddings(tiny_data.classnames, tiny_data.templates)
    assert model.class_embeddings(tiny_data.classnames, tiny_data.templates) is first


def test_zero_shot_has_nothing_to_fit(tiny_data, cpu_trainer):
    with pytest.raises(ClipAdaptError, match="clipadapt test"):
        cpu_trainer(max_epochs=1).fit(build(ZeroShotCLIP, tiny_data), tiny_data)


def test_prompt_ensemble_is_validated(tiny_data):
    with pytest.raises(ValueError, match="select7"):
        build(ZeroShotCLIP, tiny_data, prompts="no-such-set")


def test_linear_probe_starts_at_zero_shot_and_trains_only_its_head(tiny_data, cpu_trainer):
    probe = build(LinearProbe, tiny_data, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    zero = build(ZeroShotCLIP, tiny_data)
    zero.load_state_dict(probe.state_dict(), strict=False)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(probe(x), zero(x))
    before = {n: p.detach().clone() for n, p in probe.named_parameters()}

    cpu_trainer(max_epochs=2).fit(probe, tiny_data)

    moved = {n for n, p in probe.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"head"}


def test_test_logs_every_eval_set_and_hm(data_root, tmp_path, cpu_trainer):
    data = CLIPDataModule(
        root=str(data_root),
        dataset="oxford_pets",
        num_shots=2,
        subsample="base",
        eval_sets=["base", "novel"],
        image_size=32,
        eval_batch_size=5,
        num_workers=0,
        cache_dir=str(tmp_path),
    )
    model = build(ZeroShotCLIP, data)
    results = cpu_trainer().test(model, data, verbose=False)[0]  # one dict per loader, epoch-end keys in each
    base, novel = results["test/base/acc"], results["test/novel/acc"]
    assert results["test/hm"] == pytest.approx(harmonic_mean(base, novel))
    sizes = {s.name: len(s.classnames) for s in data.eval_sets}
    assert sizes == {"base": 3, "novel": 3}
    loaders = data.test_dataloader()
    assert results["test/base/count"] == len(loaders[0].dataset)
    assert results["test/novel/count"] == len(loaders[1].dataset)


def test_test_metrics_record_the_last_validation_not_a_sanity_check(tiny_data, cpu_trainer, tmp_path: Path):
    probe = build(LinearProbe, tiny_data, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = cpu_trainer(max_epochs=2)
    trainer.fit(probe, tiny_data)
    last_val = trainer.callback_metrics["val/acc"].item()  # logged as float32
    trainer.test(probe, tiny_data, verbose=False)
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    assert metrics["val/acc"] == pytest.approx(last_val, rel=1e-6) and "test/oxford_pets/acc" in metrics

    # Only the sanity check validated (no validation epoch in a 1-epoch run checking every 2): no val/acc.
    unvalidated = build(LinearProbe, tiny_data, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = cpu_trainer(
        max_epochs=1, num_sanity_val_steps=1, check_val_every_n_epoch=2, default_root_dir=tmp_path / "b"
    )
    trainer.fit(unvalidated, tiny_data)
    trainer.test(unvalidated, tiny_data, verbose=False)
    assert "val/acc" not in json.loads((tmp_path / "b" / "test_metrics.json").read_text())


def test_harmonic_mean_by_hand():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_stage_switch_rebuilds_the_optimizer_and_resume_keeps_the_stage(tiny_data, cpu_trainer, tmp_path: Path):
    model = build(TwoStage, tiny_data, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    text_before = {n: p.detach().clone() for n, p in model.clip.text_parameters()}
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = cpu_trainer(max_epochs=2, enable_checkpointing=True, callbacks=[ckpt])
    trainer.fit(model, tiny_data)

    assert model.stage == "all"
    (optimizer,) = trainer.optimizers
    n_params = 1 + len(list(model.clip.image_parameters()))
    assert sum(len(g["params"]) for g in optimizer.param_groups) == n_params
    assert all(torch.equal(p, text_before[n]) for n, p in model.clip.text_parameters())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert saved["clipadapt"]["stage"] == "all"

    resumed = build(TwoStage, tiny_data, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    trainer = cpu_trainer(max_epochs=3)
    trainer.fit(resumed, tiny_data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.stage == "all"
    assert sum(len(g["params"]) for g in trainer.optimizers[0].param_groups) == n_params


def test_warmup_then_cosine_by_hand(tiny_data, cpu_trainer):
    model = build(
        LinearProbe,
        tiny_data,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        warmup_epochs=1,
        warmup="constant",
        warmup_lr=1e-5,
    )
    factor = model._lr_factor(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), steps_per_epoch=2, epochs=3)
    # 2 warmup steps at 1e-5, then cosine over the remaining 4 steps from 0.1 towards 0
    expected = [1e-4, 1e-4, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4))]
    assert [factor(s) for s in range(6)] == pytest.approx(expected)


def test_a_learned_head_scores_any_subset_of_the_training_classes(tiny_data):
    probe = build(LinearProbe, tiny_data)
    with torch.no_grad():
        probe.head.mul_(torch.arange(1.0, 1 + len(probe.head))[:, None])  # rows no longer unit length
    subset = tiny_data.classnames[3:0:-1]  # 3 training classes, reordered (as ImageNet-A's 200 of 1000)
    expected = F.normalize(probe.head[[3, 2, 1]], dim=-1)
    torch.testing.assert_close(probe.class_embeddings(subset, tiny_data.templates), expected)
    other = probe.class_embeddings(["an unseen class"], tiny_data.templates)  # no trained row: text features
    torch.testing.assert_close(other, probe.clip.text_features(["an unseen class"], tiny_data.templates))


def test_a_learned_head_keeps_repeated_class_names_apart():
    # ImageNet's list, as open_clip ships it, repeats "missile" (rows 657 and 744); ImageNet-R holds the first only.
    names = ["tench", "missile", "mailbox", "mitten", "missile", "zebra"]
    templates = ["a photo of a {}."]
    probe = LinearProbe(classnames=names, templates=templates, **TINY).eval()
    with torch.no_grad():
        probe.head.copy_(torch.randn_like(probe.head))  # the zero-shot init gives both "missile" rows one value
    unit = F.normalize(probe.head, dim=-1)
    torch.testing.assert_close(probe.class_embeddings(names, templates), unit)  # the training list: by position
    for subset, rows in [
        (["tench", "missile", "mailbox"], [0, 1, 2]),  # the neighbours single out the row
        (["mitten", "missile"], [3, 4]),
        (["tench", "missile", "missile", "zebra"], [0, 1, 4, 5]),
        (["zebra", "tench"], [5, 0]),  # unique names: any order
    ]:
        torch.testing.assert_close(probe.class_embeddings(subset, templates), unit[rows])
    # one row fits both (no neighbour between), or none (a subset out of the training order): no guess
    for ambiguous in (["missile"], ["tench", "missile", "zebra"], ["mailbox", "missile", "mitten"]):
        with pytest.raises(ClipAdaptError, match="'missile' is 2 training classes .*make the class names unique"):
            probe.class_embeddings(ambiguous, templates)
