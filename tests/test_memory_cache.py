"""The in-memory uint8 cache of training images: same draws as the PIL path, bounded, shared with workers."""

import pytest
import torch
from doubles import tiny_datamodule

from clipadapt.data.datamodule import CLIP_STD, DecodedImages

LEVEL = torch.tensor(CLIP_STD)[:, None, None] * 255  # one normalised unit in levels of 255, per channel


def epoch(data, index: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training epoch `index`: its order and augmentation come from (data seed, epoch, item), not the global RNG."""
    loader = data.train_dataloader()
    loader.sampler.set_epoch(index)
    images, labels = zip(*loader, strict=True)
    return torch.cat(images), torch.cat(labels)


def test_cached_epoch_draws_the_same_crops_as_decoding(data_root, tmp_path):
    plain = tiny_datamodule(data_root, tmp_path, num_shots=4)
    cached = tiny_datamodule(data_root, tmp_path, num_shots=4, memory_cache_mb=64)
    (a, labels_a), (b, labels_b) = epoch(plain), epoch(cached)
    assert torch.equal(labels_a, labels_b) and a.shape == b.shape  # the same order
    # The same crop boxes and flips; only the resampling differs (torch's bicubic vs PIL's): within 2 levels of 255.
    assert ((a - b).abs() * LEVEL).max() < 2.0
    assert len(cached._memory.images) == len(cached._load()["train"])
    assert not torch.equal(epoch(cached, 1)[0], b)  # augmentation still random from epoch to epoch


def test_the_budget_bounds_what_is_held_and_the_rest_is_decoded(data_root, tmp_path):
    items = tiny_datamodule(data_root, tmp_path, num_shots=4)._load()["train"]
    one = 3 * 32 * 32 / 2**20  # MB of one 32 px image
    memory = DecodedImages([d.path for d in items], budget_mb=5.5 * one)
    assert len(memory.images) == 5 and memory.megabytes <= 5.5 * one
    bounded = tiny_datamodule(data_root, tmp_path, num_shots=4, memory_cache_mb=5.5 * one)
    full = tiny_datamodule(data_root, tmp_path, num_shots=4, memory_cache_mb=64)
    assert torch.equal(epoch(bounded)[0], epoch(full)[0])  # a held image and a decoded one: the same tensor path


def test_the_cache_serves_worker_processes(data_root, tmp_path):
    cached = tiny_datamodule(data_root, tmp_path, num_shots=4, memory_cache_mb=64, num_workers=2)
    loader = cached.train_dataloader()
    assert loader.persistent_workers
    images = torch.cat([batch[0] for batch in loader])
    assert images.shape == (24, 3, 32, 32) and torch.isfinite(images).all()


def test_a_negative_budget_is_one_clear_error(data_root, tmp_path):
    with pytest.raises(ValueError, match="memory_cache_mb must be 0"):
        tiny_datamodule(data_root, tmp_path, memory_cache_mb=-1)
