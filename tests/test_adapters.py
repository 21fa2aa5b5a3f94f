"""CLIP-Adapter, Tip-Adapter and Tip-Adapter-F: their equations by hand, the cache, α/β on validation, exports."""

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from doubles import epoch_loss
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.methods import CLIPAdapter, TipAdapter, TipAdapterF, ZeroShotCLIP
from clipadapt.methods.adapters.clip_adapter import residual_blend
from clipadapt.methods.adapters.tip_adapter import search_alpha_beta, search_grid, tip_logits


def build(cls: type, data: CLIPDataModule, lr: float = 1e-2, **kwargs) -> torch.nn.Module:
    optimizer = lambda params: torch.optim.AdamW(params, lr=lr)  # noqa: E731 - tiny model: a large lr moves it fast
    return cls(classnames=data.classnames, templates=data.templates, optimizer=optimizer, **TINY, **kwargs).eval()


def zero_shot_twin(model: torch.nn.Module, data: CLIPDataModule) -> ZeroShotCLIP:
    zero = ZeroShotCLIP(classnames=data.classnames, templates=data.templates, **TINY).eval()
    zero.clip.load_state_dict(model.clip.state_dict())
    return zero


def accuracy(model: torch.nn.Module, data: CLIPDataModule) -> float:
    data.setup("test")
    with torch.no_grad():
        hits = [(model(x).argmax(-1) == y).float() for x, y in data.test_dataloader()[0]]
    return torch.cat(hits).mean().item()


# ---- CLIP-Adapter ----


def test_residual_blend_by_hand():
    features, adapted = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 8.0]])
    # 0.2·[0, 8] + 0.8·[3, 0] = [2.4, 1.6], norm √(5.76 + 2.56) = √8.32
    expected = torch.tensor([[2.4, 1.6]]) / math.sqrt(8.32)
    torch.testing.assert_close(residual_blend(features, adapted, 0.2), expected)


def test_clip_adapter_at_ratio_zero_is_zero_shot_clip_bit_for_bit(tiny_data):
    model = build(CLIPAdapter, tiny_data, residual_ratio=0.0)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), zero_shot_twin(model, tiny_data)(images))


def test_clip_adapter_trains_only_the_adapter_and_lowers_the_loss(tiny_data, cpu_trainer):
    model = build(CLIPAdapter, tiny_data)
    assert model.adapter[0].weight.shape == (8, 32) and model.adapter[2].weight.shape == (32, 8)  # D/4 bottleneck
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = epoch_loss(model, tiny_data)
    cpu_trainer(max_epochs=4, limit_val_batches=0).fit(model, tiny_data)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"adapter.0.weight", "adapter.2.weight"}
    assert epoch_loss(model, tiny_data) < loss
    state = model.export_state_dict()
    assert torch.equal(state["clip_adapter.0.weight"], model.adapter[0].weight)
    assert state["clip_adapter.residual_ratio"].item() == pytest.approx(0.2)


# ---- Tip-Adapter's equations ----


def test_tip_logits_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # unit test features
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])  # W_c, two classes
    keys = torch.tensor([[0.0, 1.0], [0.8, 0.6], [1.0, 0.0]])  # F_train
    values = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # L_train: labels 1, 0, 0
    alpha, beta, s = 2.0, 3.0, 10.0
    # image 1: f·Kᵀ = [0, 0.8, 1] -> A = [e^-3, e^-0.6, 1]; A·L = [e^-0.6 + 1, e^-3]; s·f·Wᵀ = [10, 6]
    # image 2: f·Kᵀ = [1, 0.6, 0] -> A = [1, e^-1.2, e^-3]; A·L = [e^-1.2 + e^-3, 1]; s·f·Wᵀ = [0, 8]
    e = math.exp
    expected = torch.tensor(
        [[10 + 2 * (e(-0.6) + 1), 6 + 2 * e(-3)], [0 + 2 * (e(-1.2) + e(-3)), 8 + 2 * 1.0]], dtype=torch.float32
    )
    torch.testing.assert_close(tip_logits(f, text, keys, values, alpha, beta, s), expected)


def test_search_grid_is_the_public_one():
    grid = search_grid(7.0, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1) and grid[1] == pytest.approx(0.1 + 6.9 / 200)
    assert grid[-1] == pytest.approx(0.1 + 199 * 6.9 / 200)


def test_search_keeps_the_first_best_grid_point():
    # Zero-shot says class 0 for both images; the cache knows image 2 is class 1. With β = 1 image 2 gets
    # [1 + α·e^-1, α], so class 1 wins once α·(1 − e^-1) > 1 (α > 1.58): α = 0.1 and 1 fail, 2 and 5 succeed.
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # zero-shot logits [1, 0] for both images
    keys, values = torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    alpha, beta, acc = search_alpha_beta(f, labels, text, keys, values, 1.0, [0.1, 1.0, 2.0, 5.0], [1.0])
    assert (alpha, beta, acc) == (2.0, 1.0, 100.0)
    alpha, beta, acc = search_alpha_beta(f, labels, text, keys, values, 1.0, [0.1], [1.0])
    assert (alpha, beta, acc) == (0.1, 1.0, 50.0)


# ---- Tip-Adapter on the tiny model ----


def run_test(
    model: torch.nn.Module, data: CLIPDataModule, cpu_trainer: Callable[..., L.Trainer], tmp_path: Path
) -> Path:
    logger = CSVLogger(tmp_path, name="run")
    cpu_trainer(logger=logger).test(model, data)
    return Path(logger.log_dir)


def test_cache_is_the_normalised_mean_of_augmented_training_features(tiny_data, cpu_trainer, tmp_path):
    model = build(TipAdapter, tiny_data, augment_epochs=3)
    torch.manual_seed(5)
    run_test(model, tiny_data, cpu_trainer, tmp_path)
    train = tiny_data.train_dataloader()
    labels = torch.tensor([label for _, label, _ in train.dataset.items])
    assert torch.equal(model.cache_labels, labels)  # one key per training image, in the split's order
    torch.manual_seed(5)  # the same augmented views again
    views = torch.stack([model._encode_split(train, normalize=False)[0] for _ in range(3)])  # (3, N, D)
    torch.testing.assert_close(model.cache_keys, F.normalize(views.mean(0), dim=-1))
    assert not torch.allclose(model.cache_keys, F.normalize(views[0], dim=-1))  # the views were averaged


def test_training_free_tip_adapter_chooses_alpha_beta_on_validation_and_beats_zero_shot(
    tiny_data, cpu_trainer, tmp_path
):
    model = build(TipAdapter, tiny_data)
    run_dir = run_test(model, tiny_data, cpu_trainer, tmp_path)
    chosen = json.loads((run_dir / "tip_adapter.json").read_text())
    assert chosen["val_images"] == len(tiny_data.val_dataloader().dataset)  # searched on validation, not test
    assert (model.alpha.item(), model.beta.item()) == pytest.approx((chosen["alpha"], chosen["beta"]))
    assert min(abs(chosen["alpha"] - a) for a in search_grid(3.0, 20)) < 1e-6  # grid points
    assert min(abs(chosen["beta"] - b) for b in search_grid(7.0, 200)) < 1e-6
    assert accuracy(model, tiny_data) > accuracy(zero_shot_twin(model, tiny_data), tiny_data)


def test_without_a_validation_split_the_initial_alpha_beta_stay(tiny_data, cpu_trainer, tmp_path, monkeypatch):
    monkeypatch.setattr(tiny_data, "val_dataloader", lambda: [])  # as ImageNet: no val split
    model = build(TipAdapter, tiny_data, init_alpha=0.7, init_beta=4.0)
    run_dir = run_test(model, tiny_data, cpu_trainer, tmp_path)
    assert (model.alpha.item(), model.beta.item()) == pytest.approx((0.7, 4.0))
    assert not (run_dir / "tip_adapter.json").exists()


def test_other_classes_get_no_cache_votes_and_a_subset_votes_with_its_columns(tiny_data, cpu_trainer, tmp_path):
    model = build(TipAdapter, tiny_data)
    run_test(model, tiny_data, cpu_trainer, tmp_path)
    images = torch.randn(3, 3, 32, 32)
    zero = zero_shot_twin(model, tiny_data)
    with torch.no_grad():
        novel = ["zebra", "kettle", "violin"]
        text = zero.class_embeddings(novel, tiny_data.templates)
        assert torch.equal(
            model.classify(images, model.class_embeddings(novel, tiny_data.templates)), zero.classify(images, text)
        )
        subset = tiny_data.classnames[::2]
        full = model(images)
        got = model.classify(images, model.class_embeddings(subset, tiny_data.templates))
        torch.testing.assert_close(got, full[:, ::2])


def test_tip_adapter_f_trains_the_keys_and_its_checkpoint_restores_the_cache(tiny_data, cpu_trainer, tmp_path):
    model = build(TipAdapterF, tiny_data, lr=1e-2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = cpu_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[ckpt], logger=CSVLogger(tmp_path))
    trainer.fit(model, tiny_data)
    restored = TipAdapterF.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")  # a fresh module: empty cache
    assert torch.equal(restored.cache_keys, model.cache_keys) and torch.equal(restored.cache_labels, model.cache_labels)
    assert restored.alpha.item() == model.alpha.item() and model.alpha.item() != 1.17  # chosen before the save
    out = tmp_path / "tip.pt"
    main(["export", "--ckpt", str(tmp_path / "ckpt" / "last.ckpt"), "--out", str(out)])
    assert torch.load(out, weights_only=True).keys() == model.clip.model.state_dict().keys()  # plain open_clip
    extras = torch.load(tmp_path / "tip.extras.pt", weights_only=True)  # the cache goes beside it
    assert torch.equal(extras["tip_adapter.keys"], model.cache_keys) and extras["tip_adapter.beta"] == model.beta


def test_tip_adapter_f_moves_the_keys_and_lowers_the_loss(tiny_data, cpu_trainer):
    model = build(TipAdapterF, tiny_data, lr=1e-2)
    trainer = cpu_trainer(max_epochs=0)
    trainer.fit(model, tiny_data)  # no epoch: builds the cache only
    keys, loss = model.cache_keys.detach().clone(), epoch_loss(model, tiny_data, train_mode=True)
    cpu_trainer(max_epochs=4, limit_val_batches=0).fit(model, tiny_data)
    assert not torch.equal(model.cache_keys, keys)
    assert epoch_loss(model, tiny_data, train_mode=True) < loss  # train mode: the initial α, β


@pytest.mark.slow  # two processes: make test-slow
def test_ddp_ranks_share_rank_zeros_cache_and_choice(tmp_path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    here = Path(__file__).resolve().parent
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(here), str(here.parent)])}
    script = [sys.executable, str(here / "ddp_tip.py"), str(tmp_path / "data"), str(tmp_path)]
    subprocess.run(script, cwd=tmp_path, env=env, check=True, capture_output=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert not torch.equal(rank0["local"], rank1["local"]), "the test needs ranks that would disagree on their own"
    assert torch.equal(rank0["keys"], rank1["keys"]) and torch.equal(rank0["alpha"], rank1["alpha"])


def test_bad_options_fail_at_construction(tiny_data):
    with pytest.raises(ValueError, match="augment_epochs"):
        build(TipAdapter, tiny_data, augment_epochs=0)
    with pytest.raises(ValueError, match="residual_ratio"):
        build(CLIPAdapter, tiny_data, residual_ratio=2.0)
