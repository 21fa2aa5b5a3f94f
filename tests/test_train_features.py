"""Train features computed once under `data.train_augment: false` (issue 16): counted at the tower, same result.

Every fit counts the images that go through `CLIPBackbone.encode_image` (the one pass over the train
split included) and compares its trained weights with the same fit with the lookup off
(`lookup_train_features = False`), which encodes every step. DDP is not run here: each rank's rows come
from its own `EpochSampler` shard (the loader's batch sampler), and every rank encodes the whole split
once (`AdaptationModule._train_lookup`).
"""

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import TINY
from doubles import QUIET, tiny_datamodule

from clipadapt.data.datamodule import build_tensor_transform, build_transform
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import FT, CLIPAdapter, CLIPLoRA, CoCoOp, CoOp, LinearProbe, MaPLe, PromptSRC, TipAdapterF
from clipadapt.methods.rada import RAda

EPOCHS = 3


def fit(method: type, data, encoded: dict[str, int], lookup: bool = True, epochs: int = EPOCHS, **kwargs):
    """(images through the tower during the fit, the trained parameters) of a fit without validation."""
    torch.manual_seed(0)  # the same init both ways
    model = method(data.classnames, data.templates, **(TINY | kwargs))
    model.lookup_train_features = lookup
    before = encoded["images"]
    trainer = L.Trainer(**QUIET, devices=1, max_epochs=epochs, limit_val_batches=0, default_root_dir=data.cache_dir)
    trainer.fit(model, data)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return encoded["images"] - before, trained


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def fixed(data_root: Path, tmp_path: Path, **overrides):
    return tiny_datamodule(data_root, tmp_path / "draws", train_augment=False, **overrides)


def adam(lr: float = 1e-2):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def test_fixed_train_transform_is_the_evaluation_one(data_root, tmp_path):
    data = fixed(data_root, tmp_path, train_crop_scale=(0.5, 1.0), train_flip=True)  # both ignored
    assert repr(data.train_dataloader().dataset.transform) == repr(build_transform(32, train=False))
    loader = data.train_dataloader()

    def by_item() -> tuple[list[int], dict[int, torch.Tensor]]:
        order = [key.index for batch in loader.batch_sampler for key in batch]
        return order, dict(zip(order, torch.cat([x for x, _ in loader]), strict=True))

    order, first = by_item()
    loader.sampler.set_epoch(1)
    other, second = by_item()
    assert order != other and sorted(order) == sorted(other)  # another order, the same pixels per item
    assert all(torch.equal(first[i], second[i]) for i in first)
    cached = fixed(data_root, tmp_path, memory_cache_mb=64).train_dataloader().dataset.transform
    assert repr(cached) == repr(build_tensor_transform(32, train=False))


@pytest.mark.parametrize("method", [LinearProbe, CLIPAdapter, CoOp, CoCoOp])  # unit, unnormalized; text trains
def test_a_frozen_plain_tower_encodes_each_training_image_once(data_root, tmp_path, encoded, method):
    data = fixed(data_root, tmp_path)
    images = len(data._load()["train"])
    steps = EPOCHS * (images // data.batch_size)
    once, trained = fit(method, data, encoded, optimizer=adam(1e-3))
    every, reference = fit(method, data, encoded, lookup=False, optimizer=adam(1e-3))
    assert (once, every) == (images, steps * data.batch_size)
    assert_same(trained, reference)


def test_promptsrc_looks_up_its_teacher_and_encodes_its_prompted_images(data_root, tmp_path, encoded):
    # The frozen, unprompted tower's features (the consistency terms' teacher) are rows; the prompted path encodes.
    data = fixed(data_root, tmp_path)
    images = len(data._load()["train"])
    steps = EPOCHS * (images // data.batch_size)
    once, trained = fit(PromptSRC, data, encoded, optimizer=adam(1e-3), gpa_mean=1.0)
    every, reference = fit(PromptSRC, data, encoded, lookup=False, optimizer=adam(1e-3), gpa_mean=1.0)
    assert (once, every) == (images + steps * data.batch_size, 2 * steps * data.batch_size)
    assert_same(trained, reference)


@pytest.mark.parametrize("chunk", [1, 4])
def test_rada_eft_looks_up_its_chunks(data_root, tmp_path, encoded, chunk):
    data = fixed(data_root, tmp_path)
    images = len(data._load()["train"])
    kwargs = dict(prompts="simple", feature_chunk=chunk, optimizer=adam())
    once, adapter = fit(RAda, data, encoded, **kwargs)
    every, reference = fit(RAda, fixed(data_root, tmp_path), encoded, lookup=False, **kwargs)
    assert once == images and every == EPOCHS * images  # 24 images, batch 4: no step dropped
    assert_same(adapter, reference)


def test_tip_adapter_f_builds_its_cache_in_one_pass_and_trains_on_it(data_root, tmp_path, encoded):
    data = fixed(data_root, tmp_path)
    images = len(data._load()["train"])
    kwargs = dict(augment_epochs=10, optimizer=adam(1e-3), search=False)
    once, keys = fit(TipAdapterF, data, encoded, **kwargs)
    every, reference = fit(TipAdapterF, fixed(data_root, tmp_path), encoded, lookup=False, **kwargs)
    assert once == images  # the cache pass, then no encoding in 3 epochs of training
    assert every == images + EPOCHS * images  # the one-pass cache (not 10 passes), then every step
    assert_same(keys, reference)


def test_with_augmentation_every_step_encodes(data_root, tmp_path, encoded):
    data = tiny_datamodule(data_root, tmp_path / "draws")
    count, _ = fit(LinearProbe, data, encoded)
    assert count == EPOCHS * len(data._load()["train"])


@pytest.mark.parametrize(("method", "kwargs"), [(FT, {}), (MaPLe, {"prompt_depth": 1})])
def test_a_trained_or_prompted_image_side_encodes_every_step(data_root, tmp_path, encoded, method, kwargs):
    """FT trains the tower (the guard); MaPLe's image path is prompted (it never asks `image_features`)."""
    data = fixed(data_root, tmp_path)
    count, _ = fit(method, data, encoded, optimizer=adam(1e-4), **kwargs)
    assert count == EPOCHS * len(data._load()["train"])


def test_a_sweep_shares_the_train_features_on_disk(data_root, tmp_path, encoded):
    store = str(tmp_path / "features")
    first, _ = fit(LinearProbe, fixed(data_root, tmp_path, feature_cache=store), encoded, optimizer=adam(1e-3))
    second, _ = fit(LinearProbe, fixed(data_root, tmp_path, feature_cache=store), encoded, optimizer=adam(1e-2))
    assert first == len(fixed(data_root, tmp_path)._load()["train"]) and second == 0


def test_a_batchnorm_tower_in_train_mode_encodes_and_in_eval_mode_looks_up(data_root, tmp_path, encoded):
    """A ResNet tower: BatchNorm in train mode (linear probe) is not its eval output; RAda runs it in eval mode."""
    data = fixed(data_root, tmp_path)
    images = len(data._load()["train"])
    count, _ = fit(LinearProbe, data, encoded, arch="clipadapt-tiny-rn")
    assert count == EPOCHS * images
    count, _ = fit(RAda, data, encoded, arch="clipadapt-tiny-rn", prompts="simple", optimizer=adam())
    assert count == images


def test_split_features_runs_the_tower_as_at_inference(tiny_data, cpu_trainer):
    """In train mode too (Tip-Adapter-F's search at an epoch end): BatchNorm's statistics are used, not updated."""
    model = LinearProbe(tiny_data.classnames, tiny_data.templates, arch="clipadapt-tiny-rn", pretrained=None)
    cpu_trainer(max_epochs=0).fit(model, tiny_data)  # attaches the trainer
    dataset = tiny_data.val_dataloader().dataset
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model.clip.encode_image(x) for x, _ in torch.utils.data.DataLoader(dataset, 4)])
    model.train()
    stats = {k: v.clone() for k, v in model.clip.model.visual.state_dict().items() if "running" in k}
    torch.testing.assert_close(model.split_features(dataset, 4), expected)
    assert all(torch.equal(v, model.clip.model.visual.state_dict()[k]) for k, v in stats.items())
    assert model.clip.model.visual.training  # the flags are restored


def test_only_mode_free_towers_are_looked_up_in_train_mode(tiny_data):
    model = LinearProbe(tiny_data.classnames, tiny_data.templates, **TINY).train()
    assert model._tower_as_at_inference()  # a native ViT without dropout
    model.clip.model.visual.transformer.resblocks[0].attn.dropout = 0.1
    assert not model._tower_as_at_inference()
    assert model.eval()._tower_as_at_inference()


def test_a_mid_epoch_resume_encodes_the_rest_of_that_epoch(data_root, tmp_path, encoded):
    """Lightning's batch_idx then counts on from the checkpoint while the loader starts over: rows would be wrong."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = fixed(data_root, tmp_path)
    save = ModelCheckpoint(tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)  # 6 steps per epoch
    torch.manual_seed(0)
    model = LinearProbe(data.classnames, data.templates, **TINY)
    L.Trainer(**QUIET | dict(enable_checkpointing=True), devices=1, max_epochs=1, limit_val_batches=0,
              callbacks=[save], default_root_dir=tmp_path).fit(model, data)  # fmt: skip
    heads, counts = [], []
    for lookup in (True, False):
        model = LinearProbe(data.classnames, data.templates, **TINY)
        model.lookup_train_features = lookup
        before = encoded["images"]
        trainer = L.Trainer(**QUIET, devices=1, max_epochs=EPOCHS, limit_val_batches=0, default_root_dir=tmp_path)
        with pytest.warns(UserWarning, match="resuming from a checkpoint that ended before the epoch ended"):
            trainer.fit(model, fixed(data_root, tmp_path), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
        heads.append(model.head.detach().clone())
        counts.append(encoded["images"] - before)
    images = len(data._load()["train"])
    assert counts == [images // 2 + images, images // 2 + (EPOCHS - 1) * images]  # the rest of epoch 0 encodes
    torch.testing.assert_close(heads[0], heads[1], atol=1e-6, rtol=0)


# ---- feature_chunk: a loader batch of several steps, the chunk encoded in one forward (any frozen-tower method) ----


@pytest.mark.parametrize(("method", "kwargs"), [(CoCoOp, {}), (LinearProbe, {}), (CLIPLoRA, {"encoders": "text"})])
def test_feature_chunk_takes_the_per_step_runs_steps(data_root, tmp_path, encoded, method, kwargs):
    """Batch 1, chunks of 5 steps (not dividing the 24-image epoch), augmented: the per-step run's steps.

    CLIP-LoRA's text-side dropout draws in every step: each chunked step is seeded as that step of the other run.
    """
    runs = {}
    for chunk in (1, 5):
        data = tiny_datamodule(data_root, tmp_path / "draws", batch_size=1)
        L.seed_everything(3)
        runs[chunk] = fit(method, data, encoded, epochs=2, feature_chunk=chunk, optimizer=adam(1e-3), **kwargs)
    (every, reference), (chunked, trained) = runs[1], runs[5]
    assert every == 48  # one image per step, 24 steps an epoch
    assert chunked == 48  # the same images, five steps' worth per forward ...
    assert_same(trained, reference, atol=1e-4)  # ... and the same steps, up to the batched forward's rounding


def test_feature_chunk_encodes_once_per_chunk(data_root, tmp_path, encoded):
    data = tiny_datamodule(data_root, tmp_path / "draws", batch_size=1)
    fit(CoCoOp, data, encoded, epochs=1, feature_chunk=5, optimizer=adam(1e-3))
    assert encoded["calls"] == [5, 5, 5, 5, 4]  # 24 steps: four chunks of 5 and the rest


@pytest.mark.parametrize(("method", "kwargs", "why"), [
    (FT, {}, "trains the image tower"),
    (RAda, {"setting": "fft", "probe_epochs": 1, "probe_schedule_epochs": 1}, "stage 'finetune'"),
])  # fmt: skip
def test_feature_chunk_is_refused_where_the_image_tower_trains(data_root, tmp_path, encoded, method, kwargs, why):
    data = tiny_datamodule(data_root, tmp_path / "draws", batch_size=1)
    with pytest.raises(ClipAdaptError, match=why):
        fit(method, data, encoded, epochs=2, feature_chunk=4, optimizer=adam(1e-3), **kwargs)
