"""A small, learnable dataset written to disk in the CoOp layout of any row of `DATASETS` (tests, demo).

Each class shows the colour its name says and a stripe pattern (orientation, frequency) given by
its shape word, under per-image phase, colour jitter and pixel noise, so even a tiny CLIP can learn it from a few shots. The files go
through the same readers as real data: split json (with StanfordCars' dataset-dir prefix),
FGVCAircraft's txt files, ImageNet folders + classnames.txt, and the OOD layouts (V2 numbered
folders, Sketch, A and R with a subset of the classes), all sharing wnids and classnames so a model
trained on synthetic ImageNet can be evaluated on its synthetic OOD sets.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from clipadapt.data.readers import DATASETS, DatasetInfo, absolute_root, resolve_dataset

__all__ = ["synthetic_classnames", "write_synthetic"]

MARKER = ".clipadapt_synthetic.json"
# Class colour words with their RGB, and pattern words; a class's image shows its colour and its pattern.
COLOURS = {
    "red": (0.85, 0.1, 0.1),
    "blue": (0.1, 0.2, 0.9),
    "green": (0.1, 0.75, 0.15),
    "yellow": (0.95, 0.9, 0.1),
    "purple": (0.55, 0.15, 0.75),
    "orange": (1.0, 0.55, 0.05),
    "pink": (1.0, 0.5, 0.75),
    "brown": (0.5, 0.3, 0.1),
    "grey": (0.5, 0.5, 0.5),
    "cyan": (0.1, 0.85, 0.9),
    "white": (0.95, 0.95, 0.95),
    "black": (0.12, 0.12, 0.12),
}
SHAPES = ("circle", "square", "stripe", "ring", "dot", "wave", "cross", "star")
# Mild per-dataset style shifts so the OOD sets are not copies of ImageNet: (desaturation, noise std).
STYLES = {"imagenet_sketch": (0.6, 0.06), "imagenet_a": (0.0, 0.14), "imagenet_r": (0.3, 0.08)}


def _words(i: int) -> tuple[int, int]:
    """(colour index, shape index) of class i; unique for the first 12 * 8 classes."""
    return i % len(COLOURS), (i // len(COLOURS) + i) % len(SHAPES)


def synthetic_classnames(num_classes: int) -> list[str]:
    """Word-like raw classnames; every other one joins its words with "_" to exercise the prompt rule."""
    names = []
    for i in range(num_classes):
        colour, shape = _words(i)
        words = [list(COLOURS)[colour], SHAPES[shape]]
        if i >= len(COLOURS) * len(SHAPES):
            words.append(str(i))  # keep names unique beyond the word list (images then repeat)
        names.append(("_" if i % 2 else " ").join(words))
    return names


def _wnid(i: int) -> str:
    return f"n{1440764 + 9173 * i:08d}"  # increasing, so sorted-wnid order equals class order


def _image(label: int, size: int, rng: np.random.Generator, style: tuple[float, float]) -> Image.Image:
    """One image of class `label`: its colour x its stripe pattern, with random phase, jitter and noise."""
    colour_index, shape = _words(label)
    colour = np.array(list(COLOURS.values())[colour_index]) + rng.normal(0, 0.04, 3)
    angle = math.pi * (shape % 4) / 4
    freq = 2 + shape // 4  # periods across the image
    yy, xx = np.mgrid[0:size, 0:size] / size
    phase = rng.uniform(0, 2 * math.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)) + phase)
    img = colour[None, None, :] * (0.45 + 0.55 * stripes[..., None])  # (H, W, 3)
    desaturate, noise = style
    img = (1 - desaturate) * img + desaturate * img.mean(-1, keepdims=True)
    img = img + rng.normal(0, noise, img.shape)
    return Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB")


def _save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=95)


def _write(info: DatasetInfo, out: Path, names: list[str], counts: dict[str, int], size: int, seed: int) -> None:
    """Write dataset `info` into the (empty) folder `out`."""
    n = len(names)
    rng = np.random.default_rng([seed, zlib.crc32(info.name.encode())])
    style = STYLES.get(info.name, (0.0, 0.08))

    def image(label: int) -> Image.Image:
        return _image(label, size, rng, style)

    if info.reader in ("json", "aircraft"):
        splits: dict[str, list[list]] = {}
        serial = 0
        for split, per_class in counts.items():
            entries = []
            for label, name in enumerate(names):
                for _ in range(per_class):
                    serial += 1
                    if info.reader == "aircraft":
                        image_id = f"{1000000 + serial:07d}"
                        _save(image(label), out / info.image_dir / f"{image_id}.jpg")
                        entries.append([image_id, label, name])
                    elif info.prefix == "dataset_dir":  # StanfordCars: paths relative to the dataset folder
                        rel = f"{'cars_test' if split == 'test' else 'cars_train'}/{serial:05d}.jpg"
                        _save(image(label), out / rel)
                        entries.append([rel, label, name])
                    else:
                        ext = "png" if info.name == "synthetic" else "jpg"
                        rel = f"{name.replace(' ', '_')}/{split}_{serial:05d}.{ext}"
                        _save(image(label), out / info.image_dir / rel)
                        entries.append([rel, label, name])
            # Real split files are not grouped by class; shuffling exercises "first appearance" order.
            order = rng.permutation(len(entries))
            splits[split] = [entries[i] for i in order]
        if info.reader == "json":
            (out / info.split_file).write_text(json.dumps(splits))
        else:
            (out / info.split_file).write_text("".join(f"{name}\n" for name in names))
            for split, entries in splits.items():
                lines = "".join(f"{image_id} {name}\n" for image_id, _, name in entries)
                (out / f"images_variant_{split}.txt").write_text(lines)
        return

    # Folder datasets: classnames.txt (sorted wnid order) in every one of them, as CoOp's DATASETS.md has it.
    out.mkdir(parents=True, exist_ok=True)
    (out / info.split_file).write_text("".join(f"{_wnid(i)} {name}\n" for i, name in enumerate(names)))
    if info.reader == "imagenet":
        for split, folder in (("train", "train"), ("test", "val")):
            for label in range(n):
                for j in range(counts[split]):
                    _save(image(label), out / info.image_dir / folder / _wnid(label) / f"{_wnid(label)}_{j}.JPEG")
    elif info.reader == "imagenet_v2":
        for label in range(n):
            for j in range(counts["test"]):
                _save(image(label), out / info.image_dir / str(label) / f"{label:04d}{j:04d}.jpeg")
    else:
        labels = range(n)
        if info.name in ("imagenet_a", "imagenet_r") and n >= 2:  # A and R cover a subset (200 of 1000)
            labels = range(0 if info.name == "imagenet_r" else 1, n, 2)
        for label in labels:
            for j in range(counts["test"]):
                _save(image(label), out / info.image_dir / _wnid(label) / f"{j:04d}.JPEG")
        (out / info.image_dir / "README.txt").write_text("synthetic stand-in; folders are wnids\n")


def write_synthetic(
    root: str | os.PathLike,
    dataset: str | DatasetInfo = "synthetic",
    num_classes: int = 6,
    train_per_class: int = 8,
    val_per_class: int = 4,
    test_per_class: int = 4,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a synthetic `dataset` in its CoOp layout under `root`; returns its folder (kept if already written)."""
    info = resolve_dataset(dataset)
    if num_classes < 1 or min(train_per_class, val_per_class, test_per_class) < 0 or image_size < 1:
        raise ValueError("num_classes and image_size must be positive and the per-class counts non-negative")
    params = {
        "dataset": info.name,
        "num_classes": num_classes,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "test_per_class": test_per_class,
        "image_size": image_size,
        "seed": seed,
    }
    counts = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
    if info.reader == "imagenet":
        counts["val"] = 0  # ImageNet has no val split
    fill = lambda tmp: _write(info, tmp, synthetic_classnames(num_classes), counts, image_size, seed)  # noqa: E731
    return write_once(absolute_root(root), info.folder, params, MARKER, fill, "write_synthetic")


def write_once(
    root: Path,
    folder: str,
    params: dict,
    marker: str,
    fill: Callable[[Path], None],
    writer: str,
    error: type[Exception] = FileExistsError,
) -> Path:
    """`root/folder`, written once by `fill(tmp)` into a temporary sibling renamed into place with a marker of
    `params`: a crash leaves no half-written dataset, and concurrent writers (DDP ranks) cannot read each
    other's partial files. A folder already there must carry the same marker, else `error` (`writer` names us)."""
    target = root / folder
    if not target.exists():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=root))
        try:
            fill(tmp)
            (tmp / marker).write_text(json.dumps(params))
            os.rename(tmp, target)
            return target
        except OSError:  # another process (a DDP rank) finished first: its marker is checked below
            if not target.exists():
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    try:
        existing = json.loads((target / marker).read_text())
    except (OSError, ValueError):
        raise error(f"{target} exists and was not written by {writer}; refusing to write into it") from None
    if existing != params:
        raise error(
            f"{target} holds data {writer} wrote with {existing}, not {params}; delete the folder to rewrite it"
        )
    return target


def main(argv: list[str] | None = None) -> None:
    """`python -m clipadapt.data.synthetic ROOT [DATASET ...]`: write synthetic datasets (default: synthetic)."""
    parser = argparse.ArgumentParser(prog="python -m clipadapt.data.synthetic", description=main.__doc__)
    parser.add_argument("root", help="data root to write into")
    parser.add_argument("datasets", nargs="*", default=["synthetic"], help=f"any of: {', '.join(DATASETS)}")
    parser.add_argument("--num-classes", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.datasets:
        path = write_synthetic(args.root, name, num_classes=args.num_classes, seed=args.seed)
        print(path)  # a command-line tool's output, not library logging


if __name__ == "__main__":
    main()
