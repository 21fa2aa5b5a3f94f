"""Readers of every CoOp layout (written by write_synthetic) and their error messages."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipadapt.data import DATASETS, write_synthetic
from clipadapt.data.readers import class_names, dataset_dir, read_splits, resolve_dataset, split_source
from clipadapt.data.synthetic import synthetic_classnames
from clipadapt.data.templates import (
    DATASET_TEMPLATES,
    IMAGENET_TEMPLATES,
    PROMPTSRC_TEMPLATES,
    SELECTED_TEMPLATES,
    TEMPLATE_SETS,
    templates_for,
)

N = 6  # classes of every synthetic dataset here
SIZES = {"train": 5, "val": 3, "test": 2}
OOD = {"imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Every dataset of the table, written once in its CoOp layout."""
    path = tmp_path_factory.mktemp("DATA")
    for name in DATASETS:
        write_synthetic(path, name, num_classes=N, train_per_class=5, val_per_class=3, test_per_class=2, image_size=16)
    return path


def test_table_has_the_15_datasets_synthetic_and_the_toy_domains() -> None:
    assert len(DATASETS) == 21 and "synthetic" in DATASETS
    assert {"toy", "toy_dusk", "toy_blur", "toy_palette", "toy_habitat"} <= set(DATASETS)
    assert set(DATASET_TEMPLATES) == set(DATASETS)
    assert {info.coop_name for info in DATASETS.values()} >= {"ImageNet", "DescribableTextures", "SUN397", "ImageNetR"}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_each_layout_reads_back(root: Path, name: str) -> None:
    info = DATASETS[name]
    for spelling in (info.name, info.coop_name, info.coop_name.upper()):
        assert resolve_dataset(spelling) is info
    splits = read_splits(root, info.coop_name)
    assert splits == read_splits(root, name)
    for split, items in splits.items():
        if info.test_only:
            expected = (N // 2 if name in ("imagenet_a", "imagenet_r") else N) * SIZES[split] if split == "test" else 0
        elif name == "imagenet" and split == "val":
            expected = 0  # ImageNet has no val split
        else:
            expected = N * SIZES[split]
        assert len(items) == expected, (split, len(items))
        for d in items:
            assert os.path.isabs(d.path) and os.path.isfile(d.path)
            assert d.path.startswith(str(root / info.folder) + os.sep)
            assert type(d.label) is int
    names = class_names(splits)
    if name not in ("imagenet_a", "imagenet_r"):
        assert names == synthetic_classnames(N)  # raw names, underscores kept
        for d in (d for items in splits.values() for d in items):
            assert d.classname == names[d.label]


def test_json_prefix_image_dir_and_stanford_cars_dataset_dir(root: Path) -> None:
    pets = json.loads((root / "oxford_pets" / "split_zhou_OxfordPets.json").read_text())
    rel, label, classname = pets["train"][0]
    assert read_splits(root, "oxford_pets")["train"][0].path == str(root / "oxford_pets" / "images" / rel)
    cars = json.loads((root / "stanford_cars" / "split_zhou_StanfordCars.json").read_text())
    assert all(r.startswith("cars_train/") for r, _, _ in cars["train"] + cars["val"])
    assert all(r.startswith("cars_test/") for r, _, _ in cars["test"])
    got = read_splits(root, "StanfordCars")
    assert [d.path for d in got["test"]] == [str(root / "stanford_cars" / r) for r, _, _ in cars["test"]]
    assert [(d.label, d.classname) for d in got["test"]] == [(y, c) for _, y, c in cars["test"]]


def test_fgvc_aircraft_labels_follow_variants_txt(root: Path) -> None:
    folder = root / "fgvc_aircraft"
    variants = (folder / "variants.txt").read_text().splitlines()
    lines = (folder / "images_variant_val.txt").read_text().splitlines()
    got = read_splits(root, "fgvc_aircraft")["val"]
    assert len(got) == len(lines)
    for line, d in zip(lines, got, strict=True):
        image_id, variant = line.split(" ", 1)
        assert d.path == str(folder / "images" / f"{image_id}.jpg")
        assert d.label == variants.index(variant) and d.classname == variant


def test_imagenet_folders_and_classnames(root: Path) -> None:
    lines = (root / "imagenet" / "classnames.txt").read_text().splitlines()
    wnids = [line.split(" ", 1)[0] for line in lines]
    assert wnids == sorted(wnids)
    splits = read_splits(root, "imagenet")
    for d in splits["train"] + splits["test"]:
        assert Path(d.path).parent.name == wnids[d.label]
        assert d.classname == lines[d.label].split(" ", 1)[1]
    assert "/images/train/" in splits["train"][0].path and "/images/val/" in splits["test"][0].path
    assert [d.path for d in splits["train"]] == sorted(d.path for d in splits["train"])  # sorted listing
    v2 = read_splits(root, "imagenet_v2")["test"]
    assert all(Path(d.path).parent.name == str(d.label) for d in v2)
    assert class_names({"test": v2}) == class_names(splits)


def test_imagenet_labels_stay_with_their_wnid_when_a_train_folder_is_missing(tmp_path: Path) -> None:
    folder = write_synthetic(tmp_path, "imagenet", num_classes=4, train_per_class=2, test_per_class=1, image_size=8)
    train_dir = split_source(tmp_path, "imagenet", "train")
    assert train_dir == folder / "images" / "train" and split_source(tmp_path, "imagenet", "test").name == "val"
    (gone,) = [d for d in sorted(train_dir.iterdir()) if d.is_dir()][1:2]
    for f in gone.iterdir():
        f.unlink()
    gone.rmdir()  # class 1 has test images only
    splits = read_splits(tmp_path, "imagenet")
    assert sorted({d.label for d in splits["train"]}) == [0, 2, 3]
    label_of = {Path(d.path).parent.name: d.label for d in splits["test"]}
    assert all(label_of[Path(d.path).parent.name] == d.label for d in splits["train"])
    assert class_names(splits) == synthetic_classnames(4)


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_a_r_labels_are_positions_among_their_folders(root: Path, name: str) -> None:
    info = DATASETS[name]
    image_dir = root / info.folder / info.image_dir
    assert (image_dir / "README.txt").is_file()  # skipped: not a folder
    folders = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
    assert len(folders) == N // 2
    wnid_to_name = dict(line.split(" ", 1) for line in (root / info.folder / "classnames.txt").read_text().splitlines())
    items = read_splits(root, name)["test"]
    assert sorted({d.label for d in items}) == list(range(len(folders)))
    for d in items:
        assert Path(d.path).parent.name == folders[d.label]
        assert d.classname == wnid_to_name[folders[d.label]]
    assert class_names({"test": items}) == [wnid_to_name[w] for w in folders]


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'pets'") as err:
        resolve_dataset("pets")
    for info in DATASETS.values():
        assert info.name in str(err.value) and info.coop_name in str(err.value)


def test_missing_root_and_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data root .*nowhere does not exist.*DATASETS\.md"):
        read_splits(tmp_path / "nowhere", "oxford_pets")
    with pytest.raises(FileNotFoundError, match=r"expected the folder .*oxford_pets; .*CoOp's DATASETS\.md"):
        read_splits(tmp_path, "oxford_pets")


def test_missing_split_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "eurosat").mkdir()
    with pytest.raises(FileNotFoundError, match=r"split_zhou_EuroSAT\.json.*CoOp's DATASETS\.md"):
        read_splits(tmp_path, "eurosat")
    (tmp_path / "imagenet").mkdir()
    with pytest.raises(FileNotFoundError, match="classnames.txt"):
        read_splits(tmp_path, "imagenet")
    (tmp_path / "fgvc_aircraft").mkdir()
    with pytest.raises(FileNotFoundError, match="variants.txt"):
        read_splits(tmp_path, "fgvc_aircraft")


def test_missing_images_gives_count_and_first_paths(tmp_path: Path) -> None:
    write_synthetic(tmp_path, "food101", num_classes=3, train_per_class=2, val_per_class=1, test_per_class=1)
    items = read_splits(tmp_path, "food101")["train"]
    for d in items[:4]:
        os.remove(d.path)
    with pytest.raises(FileNotFoundError, match="4 of 12 image files") as err:
        read_splits(tmp_path, "food101")
    assert all(d.path in str(err.value) for d in items[:3]) and items[3].path not in str(err.value)


def test_malformed_split_file(tmp_path: Path) -> None:
    (tmp_path / "dtd").mkdir()
    (tmp_path / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": []}')
    with pytest.raises(ValueError, match="not a CoOp split file"):
        read_splits(tmp_path, "dtd")


def test_write_synthetic_is_idempotent_and_safe(tmp_path: Path) -> None:
    path = write_synthetic(tmp_path, "synthetic", num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1)
    split = path / "split_zhou_Synthetic.json"
    stamp = split.stat().st_mtime_ns
    assert (
        write_synthetic(tmp_path, "Synthetic", num_classes=2, train_per_class=1, val_per_class=1, test_per_class=1)
        == path
    )
    assert split.stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="delete the folder"):
        write_synthetic(tmp_path, "synthetic", num_classes=3)
    (tmp_path / "oxford_pets").mkdir()  # e.g. a real dataset: never written into
    with pytest.raises(FileExistsError, match="not written by write_synthetic"):
        write_synthetic(tmp_path, "oxford_pets")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_synthetic_images_are_learnable(root: Path) -> None:
    """A nearest-class-mean classifier on raw pixels separates the classes: a tiny CLIP can learn them."""
    splits = read_splits(root, "synthetic")

    def features(items: list) -> np.ndarray:
        return np.stack([np.asarray(Image.open(d.path).convert("RGB"), dtype=np.float32).mean((0, 1)) for d in items])

    train, test = features(splits["train"]), features(splits["test"])
    y_train = np.array([d.label for d in splits["train"]])
    means = np.stack([train[y_train == c].mean(0) for c in range(N)])
    predicted = ((test[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == np.array([d.label for d in splits["test"]])).mean() == 1.0


def test_templates() -> None:
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert len(SELECTED_TEMPLATES) == 7 and len(PROMPTSRC_TEMPLATES) == 60
    assert PROMPTSRC_TEMPLATES[0] == "a photo of a {}." and set(PROMPTSRC_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for ts in TEMPLATE_SETS.values() if ts for t in ts)
    assert templates_for("dataset", "DescribableTextures") == ["{} texture."]
    assert templates_for("dataset", "eurosat") == ["a centered satellite photo of {}."]
    assert templates_for("dataset", ["my {}."]) == ["my {}."]  # a dataset's own list, as the model holds it
    assert templates_for("simple", "dtd") == ["a photo of a {}."]
    assert templates_for("imagenet80", "dtd") == IMAGENET_TEMPLATES
    with pytest.raises(ValueError, match="unknown template set 'x'; valid: dataset, simple"):
        templates_for("x", "dtd")


def test_dataset_dir_is_absolute(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert dataset_dir("data", "ucf101") == tmp_path / "data" / "ucf101"


def test_home_relative_root_and_table_rows(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write_synthetic("~/data", resolve_dataset("dtd"), num_classes=2, train_per_class=1, test_per_class=1)
    assert path == tmp_path / "data" / "dtd"
    assert len(read_splits("~/data", DATASETS["dtd"])["train"]) == 2


def test_synthetic_command_line(tmp_path: Path, capsys) -> None:
    from clipadapt.data.synthetic import main

    main([str(tmp_path), "eurosat", "imagenet_r", "--num-classes", "3"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "eurosat"), str(tmp_path / "imagenet-rendition")]
    assert len(class_names(read_splits(tmp_path, "eurosat"))) == 3
