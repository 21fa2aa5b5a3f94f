"""RAda on the tiny model: zero-shot at init, what trains in EFT / FFT stages, resume, and TTT invariants."""

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import TINY
from doubles import tiny_datamodule
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.methods import ZeroShotCLIP
from clipadapt.methods.rada import RAda
from clipadapt.testtime import random_resized_crop_box

REPO = Path(__file__).resolve().parents[1]


def build(cls: type, data: CLIPDataModule, **kwargs) -> torch.nn.Module:
    return cls(classnames=data.classnames, templates=data.templates, **TINY, **kwargs).eval()


def adam(lr: float = 1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def moved(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


@pytest.mark.parametrize(("setting", "prompts"), [("eft", "simple"), ("fft", "imagenet80")])
def test_at_init_logits_equal_zero_shot_clip(tiny_data, setting, prompts):
    rada = build(RAda, tiny_data, setting=setting, prompts=prompts)
    zero = build(ZeroShotCLIP, tiny_data, prompts=prompts)
    zero.load_state_dict(rada.state_dict(), strict=False)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rada(x), zero(x))
        if setting == "eft":  # any class set: the adapter does not depend on the class count
            text = rada.class_embeddings(["zebra", "kettle", "violin"], tiny_data.templates)
            torch.testing.assert_close(rada.classify(x, text), zero.classify(x, text))


def test_eft_trains_only_the_adapter_and_logs_mask_pictures(tiny_data, cpu_trainer, tmp_path):
    model = build(RAda, tiny_data, prompts="simple", optimizer=adam())
    before = snapshot(model)
    logger = TensorBoardLogger(tmp_path, name="tb")
    cpu_trainer(max_epochs=2, logger=logger, log_every_n_steps=1).fit(model, tiny_data)
    changed = moved(model, before)
    assert changed and all(n.startswith("adapter.") for n in changed)
    assert {"adapter.out_proj.weight", "adapter.k_proj.weight"} <= changed
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0}).Reload()
    tags = events.Tags()
    assert {"mask/heatmap_M", "mask/heatmap_R", "mask/heatmap_MR"} <= set(tags["images"])
    assert "mask/values" in tags["histograms"]
    assert {"train/ce", "train/mask_reg", "train/loss"} <= set(tags["scalars"])


@pytest.mark.parametrize("step_batch", [1, 2])
def test_eft_chunked_features_take_todays_steps(data_root, tmp_path, cpu_trainer, step_batch):
    """Chunks of 5 steps (not dividing the 24-image epoch) = today's per-batch path, up to batched-forward rounding."""
    runs = {}
    for chunk in (1, 5):
        data = tiny_datamodule(data_root, tmp_path / "cache", num_shots=4, batch_size=step_batch)
        torch.manual_seed(0)  # the same adapter init
        model = build(RAda, data, prompts="simple", warmup_epochs=1, feature_chunk=chunk, optimizer=adam())
        steps: list[int] = []

        class Steps(Callback):
            def on_train_batch_end(self, trainer, *args: Any, seen: list[int] = steps) -> None:
                seen.append(trainer.global_step)

        L.seed_everything(3)  # the same shuffles and augmentations (num_workers=0)
        trainer = cpu_trainer(max_epochs=2, limit_val_batches=0, callbacks=[Steps()])
        trainer.fit(model, data)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        runs[chunk] = (model.eval(), trainer.global_step, lr, steps)
    (today, steps_today, lr_today, _), (chunked, steps_chunked, lr_chunked, batches) = runs[1], runs[5]
    assert steps_chunked == steps_today == 2 * (24 // step_batch)  # one optimizer step per data.batch_size images
    assert batches[:2] == [5, 10]  # ... five of them per loader batch
    assert lr_chunked == pytest.approx(lr_today)  # the lr schedule counts optimizer steps, not loader batches
    for (name, a), b in zip(today.adapter.named_parameters(), chunked.adapter.parameters(), strict=True):
        torch.testing.assert_close(
            a, b, atol=1e-4, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )  # float reassociation of the batched forward
    images = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(today(images).argmax(-1), chunked(images).argmax(-1))


def test_step_chunks_keep_the_order_and_drop_only_a_partial_step():
    from torch.utils.data import BatchSampler, SequentialSampler

    from clipadapt.data.datamodule import StepChunks

    order = SequentialSampler(range(11))
    chunks = StepChunks(BatchSampler(order, 2, drop_last=True), steps=2)
    assert list(chunks) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(chunks) == 3 and chunks.num_steps == 5
    assert chunks.sampler is order  # Lightning's set_epoch reaches the order's sampler through `.sampler`


def test_mask_regularizer_only_while_the_image_tower_is_frozen(tiny_data):
    model = build(RAda, tiny_data, setting="fft", mask_reg="linf", mask_reg_weight=2.0).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model._apply_stage("probe")
    assert set(model.training_losses(x, y)) == {"ce", "mask_reg"}
    assert model.training_losses(x, y)["mask_reg"].item() == 0.0  # M ≡ 1 at init
    model._apply_stage("finetune")
    assert set(model.training_losses(x, y)) == {"ce"}


def test_fft_probe_then_finetune_and_resume_across_the_boundary(tiny_data, cpu_trainer, tmp_path):
    kwargs = dict(setting="fft", prompts="simple", probe_epochs=1, probe_lr=1e-2, finetune_lr=1e-3)
    model = build(RAda, tiny_data, optimizer=adam(), **kwargs)
    before = snapshot(model)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    cpu_trainer(max_epochs=1, enable_checkpointing=True, callbacks=[ckpt]).fit(model, tiny_data)
    assert model.stage == "probe"
    changed = moved(model, before)
    assert "head" in changed and "adapter.out_proj.weight" in changed
    assert all(n == "head" or n.startswith("adapter.") for n in changed)

    resumed = build(RAda, tiny_data, optimizer=adam(), **kwargs)
    trainer = cpu_trainer(max_epochs=2)
    trainer.fit(resumed, tiny_data, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.stage == "finetune"
    (optimizer,) = trainer.optimizers
    image = [p for _, p in resumed.clip.image_parameters()]
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(image) + 1 + len(
        list(resumed.adapter.parameters())
    )
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(1e-3)
    changed = moved(resumed, snapshot(model))
    assert any(n.startswith("clip.model.visual.") for n in changed)
    assert "head" in changed and "adapter.out_proj.weight" in changed
    text_names = {f"clip.model.{n}" for n, _ in resumed.clip.text_parameters()}
    assert not changed & (text_names | {"clip.model.logit_scale"})


class LearningRates(Callback):
    """The learning rate of every optimizer step."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_fft_probe_follows_a_longer_cosine_cut_where_the_probe_ends(tiny_data, cpu_trainer):
    # As RAda-FT starting from epoch 5 of a 10-epoch RAda run: a 1-epoch probe on a 2-epoch cosine.
    kwargs = dict(setting="fft", prompts="simple", probe_epochs=1, probe_schedule_epochs=2, probe_lr=1e-2)
    model = build(RAda, tiny_data, optimizer=adam(), finetune_lr=1e-3, warmup_epochs=0, **kwargs)
    rates = LearningRates()
    cpu_trainer(max_epochs=2, limit_val_batches=0, callbacks=[rates]).fit(model, tiny_data)
    # 3 steps per epoch: the probe's cosine spans 6 steps and stops after 3 (its lr is then half, not 0);
    # the finetune stage has its own cosine over its 3 steps.
    probe = [1e-2 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(3)]
    finetune = [1e-3 * 0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)]
    assert rates.lrs == pytest.approx(probe + finetune)
    with pytest.raises(ValueError, match="probe_schedule_epochs=1 is shorter than probe_epochs=2"):
        build(RAda, tiny_data, **(kwargs | dict(probe_epochs=2, probe_schedule_epochs=1)))


def test_fft_head_rows_serve_any_subset_of_the_training_classes(tiny_data):
    model = build(RAda, tiny_data, setting="fft")
    with torch.no_grad():
        model.head.add_(torch.randn_like(model.head))
    names = tiny_data.classnames
    subset = model.class_embeddings([names[2], names[0]], tiny_data.templates)
    torch.testing.assert_close(subset, torch.nn.functional.normalize(model.head[[2, 0]], dim=-1))
    text = model.class_embeddings(["unseen thing", names[0]], tiny_data.templates)  # a novel set: text features
    assert torch.allclose(text.norm(dim=-1), torch.ones(2)) and not torch.allclose(text[1], subset[1])


# ---- TTT ----


def ttt_model(data: CLIPDataModule, **kwargs) -> RAda:
    torch.manual_seed(0)
    model = build(RAda, data, setting="ttt", ttt_lr=5e-2, **kwargs)  # a large lr makes differences visible
    return model


@pytest.mark.parametrize("budget", [2**26, 8 * 6 * 6 * 5])  # one vmap call; one sample per call + view chunks
def test_ttt_batched_equals_one_by_one_and_adapts(tiny_data, budget):
    model = ttt_model(tiny_data)
    model.adapter.max_map_elements = budget
    x = torch.randn(4, 3, 32, 32)
    text = model.class_embeddings(tiny_data.classnames, tiny_data.templates)
    before = snapshot(model)
    with torch.no_grad():
        batched = model.classify(x, text)
        model.hparams.ttt_mode = "loop"
        looped = model.classify(x, text)
        zero_shot = model.adapter(model.clip.encode_image(x), text, model.clip.logit_scale.exp())[0]
    torch.testing.assert_close(batched, looped, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, zero_shot, atol=1e-3)  # the adapter did move
    assert not moved(model, before)  # both modes leave the module at its initial state


def test_ttt_ignores_order_and_batching_and_resets_between_samples(tiny_data):
    model = ttt_model(tiny_data, ttt_views=16, ttt_mode="loop")
    x = torch.randn(5, 3, 32, 32)
    text = model.class_embeddings(tiny_data.classnames, tiny_data.templates)
    with torch.no_grad():
        loop_all = model.classify(x, text)
        loop_last = model.classify(x[4:], text)  # alone: equal only if the adapter is reset per sample
        model.hparams.ttt_mode = "batched"
        order = torch.tensor([3, 0, 4, 2, 1])
        shuffled = torch.cat([model.classify(x[order[:2]], text), model.classify(x[order[2:]], text)])
    torch.testing.assert_close(loop_last, loop_all[4:], rtol=0, atol=0)
    torch.testing.assert_close(shuffled, loop_all[order], rtol=1e-5, atol=1e-5)
    assert torch.equal(shuffled.argmax(-1), loop_all[order].argmax(-1))


def test_ttt_views_keep_the_original_and_follow_the_image(tiny_data):
    model = ttt_model(tiny_data, ttt_views=8)
    x = torch.randn(3, 3, 32, 32)
    views = model._views(x)
    assert views.shape == (3, 8, 3, 32, 32) and torch.equal(views[:, 0], x)
    assert torch.equal(model._views(x[[2, 0]])[0], views[2])  # seeded by content, not batch position
    assert not torch.equal(views[0, 1], views[0, 2])
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = random_resized_crop_box(32, 24, generator)
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 24 and h > 0 and w > 0


def test_ttt_views_follow_the_run_seed_unless_one_is_given(tiny_data, monkeypatch):
    x = torch.randn(2, 3, 32, 32)
    views = {}
    for seed in (1, 2):
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))  # what seed_everything(data.seed) leaves
        views[seed] = ttt_model(tiny_data, ttt_views=8)._views(x)
    assert not torch.equal(views[1], views[2]), "seeds 1 and 2 drew the same TTT views"
    assert torch.equal(ttt_model(tiny_data, ttt_views=8, ttt_seed=1)._views(x), views[1])  # explicit wins
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert torch.equal(
        ttt_model(tiny_data, ttt_views=8)._views(x), ttt_model(tiny_data, ttt_views=8, ttt_seed=0)._views(x)
    )


def test_ttt_starts_from_an_eft_checkpoint(tiny_data, tmp_path):
    eft = build(RAda, tiny_data)
    with torch.no_grad():
        for p in eft.adapter.parameters():
            p.normal_()
    torch.save({"state_dict": eft.state_dict()}, tmp_path / "eft.ckpt")
    ttt = build(RAda, tiny_data, setting="ttt", init_checkpoint=str(tmp_path / "eft.ckpt"))
    for (name, p), q in zip(ttt.adapter.named_parameters(), eft.adapter.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_ttt_under_inference_mode_fails_clearly(tiny_data):
    model = ttt_model(tiny_data, ttt_views=4)
    text = model.class_embeddings(tiny_data.classnames, tiny_data.templates)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode: false"):
        model.classify(torch.randn(1, 3, 32, 32), text)


def test_ttt_config_runs_as_clipadapt_test(tmp_path):
    config = REPO / "configs" / "rada_ttt.yaml"
    spec = yaml.safe_load(config.read_text())
    for name in [spec["data"]["dataset"], *spec["data"]["eval_sets"]]:
        write_synthetic(tmp_path / "data", name, num_classes=4, test_per_class=2)
    main(
        ["test", "--config", str(config), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.root", str(tmp_path / "data"), "--data.cache_dir", str(tmp_path / "cache")]
        + ["--trainer.default_root_dir", str(tmp_path), "--model.init_args.ttt_views", "8"]
    )
    (metrics,) = tmp_path.glob("lightning_logs/version_*/test_metrics.json")
    assert {f"test/{name}/acc" for name in spec["data"]["eval_sets"]} <= set(yaml.safe_load(metrics.read_text()))
