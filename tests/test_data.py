"""CLIPDataModule: classes, evaluation sets, loaders, transforms, the unpadded sampler, `data check`."""

from pathlib import Path

import pytest
import torch
from doubles import drop_train_class, truncate
from torch.utils.data import DataLoader, DistributedSampler, SequentialSampler

from clipadapt.data import CLIPDataModule, EvalSet, write_synthetic
from clipadapt.data.datamodule import ImageList, UnpaddedDistributedSampler, build_transform, summarize_dataset
from clipadapt.data.fewshot import few_shot_splits
from clipadapt.data.images import ImageReadError, check_images, find_unreadable
from clipadapt.data.readers import Datum, read_splits
from clipadapt.data.synthetic import synthetic_classnames
from clipadapt.errors import ClipAdaptError

N = 6
NAMES = [n.replace("_", " ") for n in synthetic_classnames(N)]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("DATA")
    for name in ("synthetic", "oxford_pets", "imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        write_synthetic(path, name, num_classes=N, train_per_class=6, val_per_class=4, test_per_class=3)
    return path


def make(root: Path, tmp_path: Path, **kwargs: object) -> CLIPDataModule:
    defaults = {"num_shots": 4, "image_size": 32, "batch_size": 8, "eval_batch_size": 5, "num_workers": 0}
    return CLIPDataModule(root=str(root), cache_dir=str(tmp_path / "cache"), **{**defaults, **kwargs})


def test_classes_and_templates_without_setup(root: Path, tmp_path: Path) -> None:
    dm = make(root, tmp_path, dataset="OxfordPets")
    assert dm.classnames == NAMES and all("_" not in c for c in dm.classnames)
    assert dm.templates == ["a photo of a {}, a type of pet."]
    assert dm.eval_sets == [EvalSet("oxford_pets", NAMES, dm.templates, "oxford_pets")]
    assert dm.hparams.dataset == "OxfordPets" and dm.hparams.num_shots == 4  # the CLI schema keeps the given values


def test_batches_and_few_shot_counts(root: Path, tmp_path: Path) -> None:
    dm = make(root, tmp_path, dataset="synthetic", seed=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.dataset) == N * 4 and loader.drop_last  # 24 >= 8
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.max() < N
    splits = read_splits(root, "synthetic")
    train, val = few_shot_splits(splits["train"], splits["val"], 4, 2)
    assert loader.dataset.items == train
    val_loader = dm.val_dataloader()
    assert val_loader.dataset.items == val and len(val) == N * 4
    images, labels = next(iter(val_loader))
    assert images.shape == (5, 3, 32, 32)
    (test_loader,) = dm.test_dataloader()
    assert sum(len(y) for _, y in test_loader) == N * 3
    assert len(dm.predict_dataloader().dataset) == N * 3


def test_small_train_set_keeps_its_last_batch(root: Path, tmp_path: Path) -> None:
    dm = make(root, tmp_path, dataset="synthetic", num_shots=1, batch_size=32)
    assert not dm.train_dataloader().drop_last  # 6 images < 32: Dassl keeps them


def test_base_training_with_base_and_novel_eval(root: Path, tmp_path: Path) -> None:
    dm = make(root, tmp_path, dataset="oxford_pets", subsample="base", eval_sets=["base", "novel"])
    assert dm.classnames == NAMES[:3]
    assert {y for _, y, _ in dm._load()["train"]} == {0, 1, 2}
    base, novel = dm.eval_sets
    assert (base.name, base.classnames) == ("base", NAMES[:3])
    assert (novel.name, novel.classnames) == ("novel", NAMES[3:])
    assert base.templates == novel.templates == ["a photo of a {}, a type of pet."]
    loaders = dm.test_dataloader()
    assert len(loaders) == 2
    base_labels = torch.cat([y for _, y in loaders[0]])
    novel_labels = torch.cat([y for _, y in loaders[1]])
    assert sorted(base_labels.tolist()) == sorted([0, 1, 2] * 3)
    assert sorted(novel_labels.tolist()) == sorted([0, 1, 2] * 3)  # relabelled 0..2
    novel_paths = [d.path for d in loaders[1].dataset.items]
    test = read_splits(root, "oxford_pets")["test"]
    assert novel_paths == [d.path for d in test if d.label >= 3]
    assert make(root, tmp_path, dataset="oxford_pets", subsample="base").eval_sets[0].name == "base"


def test_imagenet_with_ood_eval_sets(root: Path, tmp_path: Path) -> None:
    ood = ["imagenet_v2", "ImageNetSketch", "imagenet_a", "imagenet_r"]
    dm = make(root, tmp_path, dataset="imagenet", eval_sets=["all", *ood])
    assert dm.val_dataloader() == []  # ImageNet has no val split
    sets = dm.eval_sets
    assert [s.name for s in sets] == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert all(s.classnames == NAMES for s in sets[:3])
    assert sets[3].classnames == NAMES[1::2] and sets[4].classnames == NAMES[0::2]  # the synthetic A/R subsets
    assert all(s.templates == ["a photo of a {}."] for s in sets)
    loaders = dm.test_dataloader()
    assert [len(loader.dataset) for loader in loaders] == [N * 3, N * 3, N * 3, 9, 9]
    for eval_set, loader in zip(sets, loaders, strict=True):
        images, labels = next(iter(loader))
        assert images.shape[1:] == (3, 32, 32) and labels.max() < len(eval_set.classnames)
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning leaves it in place under DDP


def test_synthetic_is_written_when_missing(tmp_path: Path) -> None:
    dm = make(tmp_path / "fresh", tmp_path, dataset="synthetic")
    assert dm.classnames == NAMES
    assert (tmp_path / "fresh" / "synthetic" / "split_zhou_Synthetic.json").is_file()


def test_bad_arguments(root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'petz'; valid names"):
        make(root, tmp_path, dataset="petz")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet_b'"):
        make(root, tmp_path, dataset="imagenet", eval_sets=["all", "imagenet_b"])
    with pytest.raises(ValueError, match="subsample must be"):
        make(root, tmp_path, dataset="synthetic", subsample="half")
    with pytest.raises(ValueError, match="test-only"):
        _ = make(root, tmp_path, dataset="imagenet_a").classnames
    with pytest.raises(ValueError, match="same set twice"):
        _ = make(root, tmp_path, dataset="oxford_pets", eval_sets=["all", "oxford_pets"]).eval_sets
    with pytest.raises(FileNotFoundError, match="dataset folder of dtd"):
        _ = make(root, tmp_path, dataset="synthetic", eval_sets=["base", "dtd"]).eval_sets
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _ = make(tmp_path / "missing", tmp_path, dataset="oxford_pets").classnames


def test_corrupt_image_names_the_path(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "dtd", num_classes=2, train_per_class=2, val_per_class=1, test_per_class=1)
    items = read_splits(tmp_path, "dtd")["test"]
    Path(items[1].path).write_bytes(b"not an image")
    ds = ImageList(items, build_transform(32, train=False), "test")
    assert ds[0][0].shape == (3, 32, 32)
    with pytest.raises(ImageReadError, match=rf"cannot read image {items[1].path} \(test split\): .*replace the file"):
        ds[1]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_unreadable_image_is_one_line_also_from_a_loader_worker(tmp_path: Path, num_workers: int) -> None:
    write_synthetic(tmp_path, "synthetic", num_classes=2, train_per_class=2, val_per_class=1, test_per_class=1)
    items = read_splits(tmp_path, "synthetic")["train"]
    truncate(items[2].path)
    loader = DataLoader(ImageList(items, build_transform(32, train=True)), batch_size=4, num_workers=num_workers)
    with pytest.raises(ImageReadError) as caught:
        next(iter(loader))
    message = str(caught.value)  # torch re-raises a worker's error with its whole traceback; one line is left
    assert message.startswith(f"cannot read image {items[2].path} (train split): OSError: image file is truncated")
    assert message.endswith("lists every unreadable image)") and "\n" not in message


def test_a_class_without_train_images_keeps_its_label_name_and_half(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, "oxford_pets", num_classes=N, train_per_class=3, val_per_class=2)
    drop_train_class(folder, "oxford_pets", 1)
    dm = make(tmp_path, tmp_path, dataset="oxford_pets", num_shots=2, eval_sets=["all", "base", "novel"])
    assert dm.classnames == NAMES and [s.classnames for s in dm.eval_sets] == [NAMES, NAMES[:3], NAMES[3:]]
    dm.setup("test")  # zero-shot: scoring a class needs no train image
    test = read_splits(tmp_path, "oxford_pets")["test"]
    assert [d.label for d in dm.test_dataloader()[1].dataset.items] == [d.label for d in test if d.label < 3]
    with pytest.raises(ClipAdaptError, match=rf"1 training class\(es\) have no image in the train split \({folder}"):
        dm.setup("fit")
    base = make(tmp_path, tmp_path, dataset="oxford_pets", num_shots=2, subsample="base")
    assert base.classnames == NAMES[:3]
    with pytest.raises(ClipAdaptError, match=f"split_zhou_OxfordPets.json\\): '{NAMES[1]}'; add train images"):
        base.setup("fit")
    make(tmp_path, tmp_path, dataset="oxford_pets", num_shots=2, subsample="novel").setup("fit")  # all have some
    assert f"note:     1 class(es) have no train image ('{NAMES[1].replace(' ', '_')}')" in summarize_dataset(
        tmp_path, "oxford_pets"
    )


def test_fit_opens_every_test_file_first(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "synthetic", num_classes=2, train_per_class=2, val_per_class=2, test_per_class=2)
    test = read_splits(tmp_path, "synthetic")["test"]
    truncate(test[0].path)  # the header still parses: left to `data check`, which decodes
    make(tmp_path, tmp_path, dataset="synthetic", num_shots=2).setup("fit")
    Path(test[3].path).write_bytes(b"")
    with pytest.raises(ClipAdaptError, match=rf"1 of 4 test images cannot be opened.*first: {test[3].path};"):
        make(tmp_path, tmp_path, dataset="synthetic", num_shots=2).setup("fit")


def test_find_unreadable_opens_or_decodes_in_parallel(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "synthetic", num_classes=2, train_per_class=4, val_per_class=0, test_per_class=0)
    paths = [d.path for d in read_splits(tmp_path, "synthetic")["train"]]
    truncate(paths[5])
    Path(paths[2]).write_bytes(b"GIF89a")  # a header with nothing behind it
    Path(paths[6]).write_bytes(b"not an image")
    header = find_unreadable(paths, decode=False, workers=3)
    assert [p for p, _ in header] == [paths[2], paths[6]]
    decoded = find_unreadable(paths, workers=3)
    assert [p for p, _ in decoded] == [paths[2], paths[5], paths[6]] and decoded == find_unreadable(paths, workers=1)
    assert "UnidentifiedImageError" in decoded[2][1] and "truncated" in decoded[1][1]
    lines, bad = check_images({"train": [Datum(p, 0, "x") for p in paths]}, limit=2)
    assert bad == 3 and lines[0] == "unreadable: 3 of 8 images cannot be decoded:"
    assert lines[1].startswith(f"  {paths[2]} (train split): ") and lines[3] == "  ... and 1 more"


def test_impossible_loader_numbers_are_refused(root: Path, tmp_path: Path) -> None:
    for flag, value in [("seed", -1), ("batch_size", 0), ("eval_batch_size", 0), ("num_workers", -1)]:
        with pytest.raises(ValueError, match=rf"^data\.{flag} must be .*, got {value}$"):
            make(root, tmp_path, dataset="synthetic", **{flag: value})


def test_transforms() -> None:
    test = build_transform(32, train=False)
    assert [type(t).__name__ for t in test.transforms] == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    assert test.transforms[0].interpolation.value == "bicubic"
    train = build_transform(32, train=True, crop_scale=(0.5, 1.0), flip=False)
    assert [type(t).__name__ for t in train.transforms] == ["RandomResizedCrop", "ToTensor", "Normalize"]
    assert train.transforms[0].scale == (0.5, 1.0)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 10])
def test_unpadded_sampler_counts_every_item_once(n: int) -> None:
    data = list(range(n))
    per_rank = [list(UnpaddedDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(per_rank[0] + per_rank[1]) == data
    assert [len(UnpaddedDistributedSampler(data, num_replicas=2, rank=r)) for r in range(2)] == [
        len(p) for p in per_rank
    ]
    assert list(UnpaddedDistributedSampler(data)) == list(SequentialSampler(data))  # no process group


def test_summarize_dataset(root: Path) -> None:
    report = summarize_dataset(root, "OxfordPets", num_shots=2, seed=1)
    assert "oxford_pets (OxfordPets)" in report and str(root / "oxford_pets") in report
    assert f"classes:  {N} (red circle, blue square" in report
    assert "train:    36 images" in report and "test:     18 images" in report
    assert "train 12, val 12 images" in report and "base/novel classes: 3 / 3" in report
    assert "test-only" in summarize_dataset(root, "imagenet_r")
    assert "note:     6 of 6 classes have fewer than 8 images" in summarize_dataset(root, "oxford_pets", num_shots=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        summarize_dataset(root / "nope", "oxford_pets")
