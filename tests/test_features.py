"""Frozen image features encoded once: per run (validation every epoch) and per sweep (`data.feature_cache`)."""

import os
from pathlib import Path

import lightning as L
import pytest
import torch
from doubles import QUIET, tiny_datamodule
from lightning.pytorch.callbacks import Callback

from clipadapt.features import FeatureStore, files_digest, weights_digest
from clipadapt.methods import LinearProbe, ZeroShotCLIP
from clipadapt.methods.rada import RAda
from clipadapt.models import CLIPBackbone


class CountEncodes(Callback):
    """Images through the image tower during validation and test batches, by split."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.split: str | None = None
        self.counts = {"val": 0, "test": 0}
        encode = CLIPBackbone.encode_image

        def counted(backbone: CLIPBackbone, images: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.split:
                self.counts[self.split] += len(images)
            return encode(backbone, images, *args, **kwargs)

        monkeypatch.setattr(CLIPBackbone, "encode_image", counted)

    def on_validation_batch_start(self, *args) -> None:
        self.split = "val"

    def on_test_batch_start(self, *args) -> None:
        self.split = "test"

    def on_validation_batch_end(self, *args) -> None:
        self.split = None

    on_test_batch_end = on_validation_batch_end


@pytest.fixture
def weights(tmp_path: Path) -> str:
    """One tiny CLIP's weights in a file, so that every run of the sweep has the same image tower."""
    path = tmp_path / "tiny.pt"
    torch.save(CLIPBackbone("clipadapt-tiny", None).model.state_dict(), path)
    return str(path)


def run(method: type, weights: str, data, counter: CountEncodes, epochs: int = 0, **kwargs) -> dict[str, float]:
    model = method(data.classnames, data.templates, arch="clipadapt-tiny", pretrained=weights, **kwargs)
    trainer = L.Trainer(
        **QUIET, devices=1, max_epochs=epochs, callbacks=[counter], check_val_every_n_epoch=1,
        default_root_dir=data.cache_dir,  # run files (test_metrics.json) in the test's folder, not the cwd
    )  # fmt: skip
    if epochs:
        trainer.fit(model, data)
    return trainer.test(model, data, verbose=False)[0]


def test_a_sweep_encodes_each_test_image_once(data_root, tmp_path, weights, monkeypatch):
    counter = CountEncodes(monkeypatch)
    cache = tmp_path / "features"
    adam = dict(optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    first = None
    for seed in (1, 2):
        for shots in (1, 2):
            data = tiny_datamodule(data_root, tmp_path / "draws", num_shots=shots, seed=seed,
                                   eval_sets=["base", "novel"], feature_cache=str(cache))  # fmt: skip
            tests = sum(len(items) for _, items in data._load_eval())
            vals = len(data._load()["val"])
            before = dict(counter.counts)
            run(ZeroShotCLIP, weights, data, counter)
            run(LinearProbe, weights, data, counter, epochs=2, **adam)  # validation in both epochs
            run(RAda, weights, data, counter, epochs=2, prompts="simple", feature_chunk=4, **adam)
            encoded = {k: counter.counts[k] - before[k] for k in counter.counts}
            assert encoded["test"] == (tests if first is None else 0)  # once in the whole sweep
            assert encoded["val"] == vals  # this draw's val split: once, for 2 methods x 2 epochs
            first = first or tests
    assert len(list(cache.glob("*.pt"))) == 2 + 4  # base and novel test sets, the val split of each of 4 draws


def test_cached_features_give_the_same_results_and_a_changed_file_is_encoded_again(
    data_root, tmp_path, weights, monkeypatch
):
    counter = CountEncodes(monkeypatch)
    data = tiny_datamodule(data_root, tmp_path / "draws", num_shots=1, eval_sets=["base"])
    plain = run(ZeroShotCLIP, weights, data, counter)
    images = counter.counts["test"]  # without a feature cache: every image, every run
    cached = tiny_datamodule(data_root, tmp_path / "draws", num_shots=1, eval_sets=["base"],
                             feature_cache=str(tmp_path / "features"))  # fmt: skip
    assert run(ZeroShotCLIP, weights, cached, counter) == plain
    encoded = counter.counts["test"]
    assert run(ZeroShotCLIP, weights, cached, counter) == plain and counter.counts["test"] == encoded  # from disk
    path = cached._load_eval()[0][1][0].path
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert run(ZeroShotCLIP, weights, cached, counter) == plain
    assert counter.counts["test"] == encoded + images == 3 * images  # the set's key changed with the file's mtime


def test_another_attention_path_is_another_key(data_root, tmp_path, weights, monkeypatch):
    # sdpa and open_clip's own blocks agree up to float rounding only: a sweep mixing them does not share features.
    counter = CountEncodes(monkeypatch)
    cached = tiny_datamodule(data_root, tmp_path / "draws", num_shots=1, eval_sets=["base"],
                             feature_cache=str(tmp_path / "features"))  # fmt: skip
    run(ZeroShotCLIP, weights, cached, counter)
    images = counter.counts["test"]
    run(ZeroShotCLIP, weights, cached, counter, attention="module")
    assert counter.counts["test"] == 2 * images
    run(ZeroShotCLIP, weights, cached, counter, attention="module")
    assert counter.counts["test"] == 2 * images  # now stored under its own key


def test_keys_follow_weights_and_files_and_a_broken_file_is_a_miss(tmp_path):
    backbone = CLIPBackbone("clipadapt-tiny", None)
    digest = weights_digest(backbone.model.visual)
    assert weights_digest(backbone.model.visual) == digest
    with torch.no_grad():
        backbone.model.visual.proj[0, 0] += 1
    assert weights_digest(backbone.model.visual) != digest
    image = tmp_path / "a.jpg"
    image.write_bytes(b"1")
    files = files_digest([str(image)])
    image.write_bytes(b"12")
    assert files_digest([str(image)]) != files
    store = FeatureStore(tmp_path / "store")
    assert store.add_rows("k", 3, torch.tensor([0, 1]), torch.ones(2, 4)) is None  # not whole yet
    assert torch.equal(
        store.add_rows("k", 3, torch.tensor([2]), torch.zeros(1, 4)), torch.tensor([[1.0] * 4] * 2 + [[0.0] * 4])
    )
    assert torch.equal(FeatureStore(tmp_path / "store").get("k")[:2], torch.ones(2, 4))
    (tmp_path / "store" / "k.pt").write_bytes(b"not a tensor")
    assert FeatureStore(tmp_path / "store").get("k") is None


def test_tip_adapter_search_reads_the_validation_features_of_the_sweep(data_root, tmp_path, weights, encoded):
    from clipadapt.methods import TipAdapter

    runs = []
    for _ in range(2):
        data = tiny_datamodule(data_root, tmp_path / "draws", num_shots=2, eval_sets=["base"],
                               feature_cache=str(tmp_path / "features"))  # fmt: skip
        model = TipAdapter(data.classnames, data.templates, arch="clipadapt-tiny", pretrained=weights, augment_epochs=1)
        before = encoded["images"]
        torch.manual_seed(0)  # the same augmented cache keys
        metrics = L.Trainer(**QUIET, devices=1, default_root_dir=tmp_path).test(model, data, verbose=False)[0]
        runs.append((encoded["images"] - before, metrics, float(model.alpha), float(model.beta)))
    vals, tests = len(data._load()["val"]), len(data._load_eval()[0][1])
    trains = len(data._load()["train"])  # the cache keys: augmented, so encoded by every run
    assert runs[0][0] == trains + vals + tests and runs[1][0] == trains
    assert runs[0][1:] == runs[1][1:]  # the same alpha, beta and test metrics from the stored validation features


def test_weights_digest_reads_zero_dim_tensors() -> None:
    """A ResNet tower's BatchNorm counters are 0-dim tensors: they enter the digest too."""
    norm = torch.nn.BatchNorm1d(3)
    before = weights_digest(norm)
    norm.num_batches_tracked += 1
    assert weights_digest(norm) != before
