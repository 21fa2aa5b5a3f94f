"""The datasets as users have them on disk (CoOp's DATASETS.md layout) and the few readers for them.

One table (`DATASETS`) says where each dataset lives under the data root; four readers turn that
layout into `Datum` lists: a split json (`[relpath, label, classname]`), FGVCAircraft's txt files,
ImageNet-style class folders with `classnames.txt`, and ImageNetV2's numbered folders. The user's
own data (`imagefolder`, `manifest`; rows of `OWN_DATASETS`, whose root is the dataset itself) goes
through the same `read_splits` into `clipadapt.data.own`.

Deliberate deviation from Dassl: folder listings are *sorted* (Dassl used `os.listdir`, whose order
depends on the filesystem), so folder-listed datasets give the same items, and therefore the same
few-shot draw, on every machine. To reproduce a published Dassl ImageNet draw exactly, keep its
`split_fewshot/*.pkl` next to the data (see `fewshot.py`).
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

__all__ = [
    "DATASETS",
    "OWN_DATASETS",
    "Datum",
    "DatasetInfo",
    "absolute_root",
    "class_names",
    "dataset_dir",
    "read_splits",
    "resolve_dataset",
    "split_source",
]

LAYOUT_HINT = "the expected layout is the one of CoOp's DATASETS.md (github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md)"
SPLITS = ("train", "val", "test")


class Datum(NamedTuple):
    """One labelled image: absolute path, 0-based label, raw classname (underscores kept)."""

    path: str
    label: int
    classname: str


ReaderKind = Literal["json", "aircraft", "imagenet", "imagenet_v2", "folders", "imagefolder", "manifest"]
OWN_DATA = ("imagefolder", "manifest")  # the user's own data (clipadapt.data.own): the root is the dataset
Prefix = Literal["image_dir", "dataset_dir", ""]


@dataclass(frozen=True)
class DatasetInfo:
    """Where one dataset lives under the data root and how to read it."""

    name: str  # snake-case name used on the command line and in log keys
    coop_name: str  # Dassl class name (`DATASET.NAME`), also accepted on the command line
    folder: str  # dataset folder under the root
    image_dir: str  # image folder inside `folder` ("" for StanfordCars: json paths carry cars_train/ or cars_test/)
    split_file: str  # split json, variants.txt (aircraft) or classnames.txt (folder datasets), inside `folder`
    reader: ReaderKind
    prefix: Prefix = "image_dir"  # what json relative paths are relative to ("" for non-json readers)
    test_only: bool = False  # OOD evaluation sets: everything is `test`

    @property
    def display(self) -> str:
        """`snake (CoOp)` for messages."""
        return f"{self.name} ({self.coop_name})"


def _json(name: str, coop: str, folder: str, image_dir: str, prefix: Prefix = "image_dir") -> DatasetInfo:
    return DatasetInfo(name, coop, folder, image_dir, f"split_zhou_{coop}.json", "json", prefix)


def _folders(name: str, coop: str, folder: str, image_dir: str, reader: ReaderKind) -> DatasetInfo:
    # Everything but ImageNet itself is an OOD evaluation set.
    return DatasetInfo(name, coop, folder, image_dir, "classnames.txt", reader, "", test_only=reader != "imagenet")


DATASETS: dict[str, DatasetInfo] = {
    info.name: info
    for info in (
        _folders("imagenet", "ImageNet", "imagenet", "images", "imagenet"),
        _json("caltech101", "Caltech101", "caltech-101", "101_ObjectCategories"),
        _json("oxford_pets", "OxfordPets", "oxford_pets", "images"),
        _json("stanford_cars", "StanfordCars", "stanford_cars", "", prefix="dataset_dir"),
        _json("oxford_flowers", "OxfordFlowers", "oxford_flowers", "jpg"),
        _json("food101", "Food101", "food-101", "images"),
        DatasetInfo("fgvc_aircraft", "FGVCAircraft", "fgvc_aircraft", "images", "variants.txt", "aircraft", ""),
        _json("sun397", "SUN397", "sun397", "SUN397"),
        _json("dtd", "DescribableTextures", "dtd", "images"),
        _json("eurosat", "EuroSAT", "eurosat", "2750"),
        _json("ucf101", "UCF101", "ucf101", "UCF-101-midframes"),
        _folders("imagenet_v2", "ImageNetV2", "imagenetv2", "imagenetv2-matched-frequency-format-val", "imagenet_v2"),
        _folders("imagenet_sketch", "ImageNetSketch", "imagenet-sketch", "images", "folders"),
        _folders("imagenet_a", "ImageNetA", "imagenet-adversarial", "imagenet-a", "folders"),
        _folders("imagenet_r", "ImageNetR", "imagenet-rendition", "imagenet-r", "folders"),
        _json("synthetic", "Synthetic", "synthetic", "images"),  # written by clipadapt.data.synthetic (tests, demo)
        # The toy world (clipadapt.toy.world), written on first use: the pretraining domain and four shifts.
        _json("toy", "Toy", "toy", "images"),
        _json("toy_dusk", "ToyDusk", "toy_dusk", "images"),
        _json("toy_blur", "ToyBlur", "toy_blur", "images"),
        _json("toy_palette", "ToyPalette", "toy_palette", "images"),
        _json("toy_habitat", "ToyHabitat", "toy_habitat", "images"),
    )
}
# The user's own data (clipadapt.data.own): the root is the dataset itself, so no folder under it.
OWN_DATASETS: dict[str, DatasetInfo] = {
    name: DatasetInfo(name, coop, "", "", "classnames.txt", name)  # type: ignore[arg-type]
    for name, coop in (("imagefolder", "ImageFolder"), ("manifest", "Manifest"))
}


def _key(name: str) -> str:
    # "imagenet_v2", "ImageNetV2" and "imagenet-v2" all mean the same dataset.
    return name.lower().replace("_", "").replace("-", "").replace(" ", "")


_LOOKUP = {_key(k): info for info in (*DATASETS.values(), *OWN_DATASETS.values()) for k in (info.name, info.coop_name)}


def resolve_dataset(name: str | DatasetInfo) -> DatasetInfo:
    """The table row for a snake-case or CoOp dataset name (case-insensitive); a row is returned as is."""
    if isinstance(name, DatasetInfo):
        return name
    info = _LOOKUP.get(_key(str(name)))
    if info is None:
        valid = ", ".join(info.display for info in (*DATASETS.values(), *OWN_DATASETS.values()))
        raise ValueError(f"unknown dataset {name!r}; valid names (snake-case or CoOp spelling): {valid}")
    return info


def absolute_root(root: str | os.PathLike) -> Path:
    """`root` with `~` expanded, made absolute (configs may say `~/data`)."""
    return Path(os.path.abspath(os.path.expanduser(root)))


def dataset_dir(root: str | os.PathLike, name: str | DatasetInfo) -> Path:
    """The dataset's folder under `root` (absolute; not checked); for own data the root (a manifest's folder)."""
    info = resolve_dataset(name)
    if info.reader == "manifest" and absolute_root(root).is_file():
        return absolute_root(root).parent
    return absolute_root(root) / info.folder


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: expected the folder {path}; {LAYOUT_HINT}")


def _check_file(path: Path, what: str, fix: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: expected the file {path}; {fix}")


def _check_images(items: list[Datum], info: DatasetInfo) -> None:
    missing = [d.path for d in items if not os.path.isfile(d.path)]
    if missing:
        first = ", ".join(missing[:3])
        raise FileNotFoundError(
            f"{info.display}: {len(missing)} of {len(items)} image files listed in {info.split_file} are missing "
            f"(first: {first}); unpack the images where CoOp's DATASETS.md puts them, or fix the root"
        )


def _listdir(path: Path, dirs: bool) -> list[str]:
    """Sorted non-hidden sub-folders (dirs=True) or files (dirs=False) of `path`."""
    with os.scandir(path) as entries:
        names = [e.name for e in entries if not e.name.startswith(".") and (e.is_dir() if dirs else e.is_file())]
    return sorted(names)


def _read_json(info: DatasetInfo, folder: Path) -> dict[str, list[Datum]]:
    split_path = folder / info.split_file
    _check_file(
        split_path,
        f"split file of {info.display}",
        f"download {info.split_file} (the split_zhou json linked from CoOp's DATASETS.md) into {folder}",
    )
    try:
        with open(split_path) as f:
            raw = json.load(f)
        prefix = folder / info.image_dir if info.prefix == "image_dir" else folder
        splits = {s: [Datum(str(prefix / rel), int(label), str(cname)) for rel, label, cname in raw[s]] for s in SPLITS}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{split_path} is not a CoOp split file ({{'train'|'val'|'test': [[relpath, label, classname], ...]}}): "
            f"{err!r}; download it again from CoOp's DATASETS.md"
        ) from err
    _check_images([d for s in SPLITS for d in splits[s]], info)
    return splits


def _read_aircraft(info: DatasetInfo, folder: Path) -> dict[str, list[Datum]]:
    fix = "FGVCAircraft's folder is the data/ folder of fgvc-aircraft-2013b (see CoOp's DATASETS.md)"
    _check_file(folder / info.split_file, "FGVCAircraft variants.txt", fix)
    variants = [line.strip() for line in (folder / info.split_file).read_text().splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(variants)}
    splits = {}
    for split in SPLITS:
        path = folder / f"images_variant_{split}.txt"
        _check_file(path, f"FGVCAircraft {split} list", fix)
        items = []
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")  # variant names may contain spaces
            if variant not in label_of:
                raise ValueError(
                    f"{path}: variant {variant!r} of image {image_id} is not in {folder / info.split_file}"
                )
            items.append(Datum(str(folder / info.image_dir / f"{image_id}.jpg"), label_of[variant], variant))
        splits[split] = items
    _check_images([d for s in SPLITS for d in splits[s]], info)
    return splits


def _read_classnames(info: DatasetInfo, folder: Path) -> dict[str, str]:
    """`classnames.txt`: `<wnid> <class name>` per line, in sorted-wnid order -> {wnid: name} (file order)."""
    path = folder / info.split_file
    _check_file(
        path,
        f"classnames.txt of {info.display}",
        "download classnames.txt as CoOp's DATASETS.md says (ImageNet section; the OOD sets use a copy of it)",
    )
    names = {}
    for line in path.read_text().splitlines():
        wnid, _, name = line.strip().partition(" ")
        if wnid:
            names[wnid] = name.strip()
    return names


def _read_class_folders(
    info: DatasetInfo, split_dir: Path, names: dict[str, str], wnids: list[str] | None = None
) -> list[Datum]:
    """Label = position of the wnid folder among `wnids` (default: the sorted folders of `split_dir`)."""
    _check_dir(split_dir, f"image folder of {info.display}")
    folders = _listdir(split_dir, dirs=True)
    label_of = {wnid: label for label, wnid in enumerate(wnids or folders)}
    items = []
    for wnid in folders:
        if wnid not in names:
            raise ValueError(f"{info.display}: folder {split_dir / wnid} has no line in {info.split_file}")
        label = label_of[wnid]
        items += [Datum(str(split_dir / wnid / f), label, names[wnid]) for f in _listdir(split_dir / wnid, dirs=False)]
    return items


def _read_folders(info: DatasetInfo, folder: Path) -> dict[str, list[Datum]]:
    names = _read_classnames(info, folder)
    if info.reader == "imagenet":
        train_dir, test_dir = folder / info.image_dir / "train", folder / info.image_dir / "val"
        for split_dir in (train_dir, test_dir):
            _check_dir(split_dir, f"image folder of {info.display}")
        # One label per wnid of either split (Dassl: per folder of each split, which shifts every label after a
        # class folder that only one split has; the same labels when both hold every class).
        wnids = sorted({*_listdir(train_dir, dirs=True), *_listdir(test_dir, dirs=True)})
        return {
            "train": _read_class_folders(info, train_dir, names, wnids),
            "val": [],  # ImageNet has no separate val; its official val set is the test split
            "test": _read_class_folders(info, test_dir, names, wnids),
        }
    if info.reader == "imagenet_v2":
        # Folders are label integers; the classname is the one at that position of classnames.txt.
        image_dir = folder / info.image_dir
        _check_dir(image_dir, f"image folder of {info.display}")
        wnids = list(names)
        items = []
        for label in range(len(wnids)):
            class_dir = image_dir / str(label)
            _check_dir(class_dir, f"{info.display} class folder {label}")
            items += [Datum(str(class_dir / f), label, names[wnids[label]]) for f in _listdir(class_dir, dirs=False)]
        return {"train": [], "val": [], "test": items}
    # Sketch, A, R: wnid folders (A and R hold 200 of them; non-folders like README.txt are skipped).
    return {"train": [], "val": [], "test": _read_class_folders(info, folder / info.image_dir, names)}


_READERS = {
    "json": _read_json,
    "aircraft": _read_aircraft,
    "imagenet": _read_folders,
    "imagenet_v2": _read_folders,
    "folders": _read_folders,
}


def read_splits(root: str | os.PathLike, name: str | DatasetInfo) -> dict[str, list[Datum]]:
    """All items of a dataset as {"train", "val", "test"} (an empty list where a split does not exist)."""
    info = resolve_dataset(name)
    if info.reader in OWN_DATA:
        from clipadapt.data import own

        return own.read_imagefolder(root) if info.reader == "imagefolder" else own.read_manifest(root)
    root_path = absolute_root(root)
    if not root_path.is_dir():
        raise FileNotFoundError(
            f"data root {root_path} does not exist; pass the folder that holds the dataset folders "
            f"(CoOp's $DATA); {LAYOUT_HINT}"
        )
    folder = root_path / info.folder
    _check_dir(folder, f"dataset folder of {info.display}")
    return _READERS[info.reader](info, folder)


def split_source(root: str | os.PathLike, name: str | DatasetInfo, split: str) -> Path:
    """The file (or folder) that lists `split` of a dataset, for messages."""
    info = resolve_dataset(name)
    folder = dataset_dir(root, info)
    if info.reader in OWN_DATA:
        from clipadapt.data import own

        if info.reader == "manifest":
            return own.manifest_path(root)
        return folder / split if (folder / "train").is_dir() else folder
    if info.reader == "aircraft":
        return folder / f"images_variant_{split}.txt"
    if info.reader == "imagenet":
        return folder / info.image_dir / ("train" if split == "train" else "val")
    return folder / (info.split_file if info.reader == "json" else info.image_dir)


def class_names(splits: dict[str, list[Datum]]) -> list[str]:
    """Raw classnames indexed by label, gathered from every split; every label 0..n-1 must occur."""
    by_label: dict[int, str] = {}
    for items in splits.values():
        for d in items:
            by_label.setdefault(d.label, d.classname)
    missing = sorted(set(range(len(by_label))) ^ set(by_label))
    if missing:
        raise ValueError(
            f"labels must be 0..n-1 with at least one image each; these are missing or extra: {missing[:10]}"
        )
    return [by_label[i] for i in range(len(by_label))]
