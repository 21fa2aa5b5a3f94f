"""The user's own images as a dataset: `imagefolder` (class folders) and `manifest` (a CSV or JSON list).

Both give the `{"train", "val", "test"}` lists of `Datum` the CoOp readers give, so the few-shot draw,
base/novel, `data check` and the evaluation sets work on them unchanged. `--data.root` is the
dataset itself (not a folder of datasets):

- `imagefolder`: ROOT holds one folder per class (`ROOT/<class>/**/<image>`), or `train/`, `test/`
  (and optionally `val/`) subfolders that each hold class folders. Labels are the positions of the
  class folders in sorted order (as torchvision's ImageFolder; in the subfolder layout, of every
  class folder of any split). Class names are the folder names (prompts turn `_` into spaces), or
  the names given by `ROOT/classnames.txt`, one `<folder> <class name>` per line (ImageNet's format;
  a line belongs to the longest folder name it starts with, so folder names may hold spaces).
- `manifest`: ROOT is a `.csv` or `.json` file (or a folder with `manifest.csv` / `manifest.json`)
  listing `path,label[,split]`. A CSV may start with a header naming the columns (`path`, `label`,
  `split`, any order); JSON is a list of `{"path", "label"[, "split"]}` objects or of
  `[path, label(, split)]` lists. Relative paths resolve against the manifest's folder. Labels are
  class names, or integers 0..n-1 indexing `classnames.txt` beside the manifest (one class name per
  line); with name labels that file is optional (then the classes are the sorted names) and, when
  present, fixes the class order. `split` is `train`, `val` or `test`, on every row or on none.

Images are files with an image extension (`IMAGE_EXTENSIONS`); other files in class folders are skipped.

Splitting (one `imagefolder` folder, or a manifest without a `split` column): each class is split
50% train / 20% val / 30% test as Dassl's `read_and_split_data` does (CoOp's DTD, EuroSAT, ...):
classes in label order, each class's files (sorted paths; manifest order for a manifest) shuffled,
then `round(n * 0.5)` train, `round(n * 0.2)` val, the rest test; every class needs an image in each
split (4 or more images). The ratio is fixed, and so is the shuffle's seed (`SPLIT_SEED`), which is
*not* `data.seed`: every few-shot seed draws from the same split and is tested on the same images, as
with CoOp's fixed split files. Deviation from Dassl: its shuffle used the global random state of the
run; here a private `random.Random(SPLIT_SEED)`, so the split depends only on the files. For another
split, use `train/ val/ test/` subfolders or a manifest `split` column.
"""

import csv
import json
import os
import random
from pathlib import Path

from clipadapt.data.readers import OWN_DATA, SPLITS, Datum, absolute_root
from clipadapt.errors import ClipAdaptError

__all__ = [
    "IMAGE_EXTENSIONS",
    "OWN_DATA",
    "SPLIT_RATIO",
    "SPLIT_SEED",
    "manifest_path",
    "read_imagefolder",
    "read_manifest",
    "split_by_ratio",
    "split_origin",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_RATIO = (0.5, 0.2)  # train, val; test is the rest (Dassl's read_and_split_data defaults)
SPLIT_SEED = 1
MANIFEST_NAMES = ("manifest.csv", "manifest.json")
CLASSNAMES = "classnames.txt"


def _first(items: list[str], limit: int = 3) -> str:
    return ", ".join(items[:limit]) + (", ..." if len(items) > limit else "")


# ---- splitting ----


def split_by_ratio(
    groups: dict[str, list[str]], labels: dict[str, int], names: dict[str, str], seed: int = SPLIT_SEED
) -> dict[str, list[Datum]]:
    """Dassl's read_and_split_data on {class: files} (classes in label order): shuffle, then 50/20/30 per class."""
    p_train, p_val = SPLIT_RATIO
    rng = random.Random(seed)
    splits: dict[str, list[Datum]] = {s: [] for s in SPLITS}
    for key in sorted(groups, key=labels.__getitem__):
        files = list(groups[key])
        rng.shuffle(files)
        n_train, n_val = round(len(files) * p_train), round(len(files) * p_val)
        if n_train == 0 or n_val == 0 or len(files) - n_train - n_val == 0:
            raise ClipAdaptError(
                f"class {names[key]!r} has {len(files)} image(s): too few to split 50% train / 20% val / 30% test with an "
                "image in each (4 or more needed); add images, or give the split yourself (train/ val/ test/ "
                "subfolders, or a manifest `split` column)"
            )
        parts = {"train": files[:n_train], "val": files[n_train : n_train + n_val], "test": files[n_train + n_val :]}
        for split, part in parts.items():
            splits[split] += [Datum(path, labels[key], names[key]) for path in part]
    return splits


# ---- imagefolder ----


def _images_under(folder: Path) -> list[str]:
    """Image files anywhere under `folder` (hidden entries skipped), sorted by relative path."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            os.path.join(parent, f) for f in files if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def _class_folders(folder: Path) -> dict[str, list[str]]:
    """{class folder name: its image files} for the class folders directly in `folder`."""
    with os.scandir(folder) as entries:
        entries = sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)
    loose = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    if loose:
        raise ClipAdaptError(
            f"{folder} holds image files directly ({_first(loose)}): put each class's images in a folder named "
            "after the class (imagefolder layout: ROOT/<class>/<image>, or ROOT/train|val|test/<class>/<image>)"
        )
    classes = {e.name: _images_under(Path(e.path)) for e in entries if e.is_dir()}
    if not classes:
        raise ClipAdaptError(f"{folder} holds no class folders; imagefolder expects ROOT/<class>/<image>")
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise ClipAdaptError(
            f"{len(empty)} empty class folder(s) in {folder}: {_first(empty)} (no {'/'.join(IMAGE_EXTENSIONS)} "
            "file); add images or remove the folder"
        )
    return classes


def _folder_names(root: Path, folders: list[str]) -> dict[str, str]:
    """{folder: class name}: the folder name, or its line of ROOT/classnames.txt (`<folder> <class name>`)."""
    path = root / CLASSNAMES
    if not path.is_file():
        return {f: f for f in folders}
    given = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        # Folder names may hold spaces: a line belongs to the longest folder name it starts with.
        starts = [f for f in folders if line == f or line.startswith(f + " ")]
        if starts:
            folder = max(starts, key=len)
            given[folder] = line[len(folder) :].strip() or folder
    missing = [f for f in folders if f not in given]
    if missing:
        raise ClipAdaptError(
            f"{path} has no line for the class folder(s) {_first(missing)}: add `<folder> <class name>` lines "
            f"for them, or delete {CLASSNAMES} to use the folder names"
        )
    return {f: given[f] for f in folders}


def _check_root(root: Path, what: str) -> None:
    if not root.exists():
        raise ClipAdaptError(f"{what} {root} does not exist; pass --data.root (data check: --root) as the {what}")


def read_imagefolder(root: str | os.PathLike) -> dict[str, list[Datum]]:
    """Class folders under `root` (or under its train/, val/, test/) as train/val/test lists of Datum."""
    path = absolute_root(root)
    _check_root(path, "image folder")
    if not path.is_dir():
        raise ClipAdaptError(f"image folder {path} is a file; imagefolder expects a folder of class folders")
    if not (path / "train").is_dir():
        groups = _class_folders(path)
        labels = {name: label for label, name in enumerate(groups)}  # sorted folder names
        return split_by_ratio(groups, labels, _folder_names(path, list(groups)))
    subdirs = {e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")}
    other = sorted(subdirs - set(SPLITS))
    if other:
        raise ClipAdaptError(
            f"{path} has train/, so it is read as train/ val/ test/ subfolders of class folders, but it also holds "
            f"{_first(other)}: move those into the splits (or the class folders out of train/)"
        )
    if "test" not in subdirs:
        raise ClipAdaptError(f"{path} has train/ but no test/: add test/<class>/<image> (val/ is optional)")
    per_split = {s: _class_folders(path / s) for s in SPLITS if s in subdirs}
    folders = sorted({name for groups in per_split.values() for name in groups})
    labels = {name: label for label, name in enumerate(folders)}
    names = _folder_names(path, folders)
    splits = {s: [] for s in SPLITS}
    for split, groups in per_split.items():
        splits[split] = [Datum(f, labels[name], names[name]) for name in groups for f in groups[name]]
    return splits


# ---- manifest ----


def manifest_path(root: str | os.PathLike) -> Path:
    """The manifest file: `root` itself, or the manifest.csv / manifest.json in the folder `root`."""
    path = absolute_root(root)
    _check_root(path, "manifest")
    if path.is_file():
        return path
    found = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
    if len(found) != 1:
        what = "both" if found else "neither"
        raise ClipAdaptError(
            f"{path} holds {what} of {' and '.join(MANIFEST_NAMES)}: pass the manifest file itself as the root"
        )
    return found[0]


def _manifest_rows(path: Path) -> list[tuple[int, str, object, str | None]]:
    """(row number, path, label, split or None) for each entry of a CSV or JSON manifest."""
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, list):
                raise TypeError("the top level is not a list")
            rows = []
            for i, entry in enumerate(raw, 1):
                if isinstance(entry, dict):
                    rows.append((i, entry["path"], entry["label"], entry.get("split")))
                else:
                    rows.append((i, entry[0], entry[1], entry[2] if len(entry) > 2 else None))
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise ClipAdaptError(
                f"{path} is not a manifest (a JSON list of {{'path', 'label'[, 'split']}} objects or "
                f"[path, label(, split)] lists): {type(err).__name__}: {err}"
            ) from err
        return rows
    if path.suffix.lower() != ".csv":
        raise ClipAdaptError(f"manifest {path}: expected a .csv or .json file")
    with open(path, newline="", encoding="utf-8-sig") as f:  # Excel writes a BOM
        table = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if not table:
        raise ClipAdaptError(f"manifest {path} is empty")
    header = [cell.strip().lower() for cell in table[0]]
    if "path" in header and "label" in header:
        columns, start = [header.index("path"), header.index("label")], 2
        columns.append(header.index("split") if "split" in header else -1)
        body = table[1:]
    else:
        columns, start, body = [0, 1, 2], 1, table
    rows = []
    for i, row in enumerate(body, start):
        cells = [cell.strip() for cell in row]
        if len(cells) <= max(columns[:2]):
            raise ClipAdaptError(f"{path}, row {i}: expected path,label[,split], got {row}")
        split = cells[columns[2]] if 0 <= columns[2] < len(cells) else None
        rows.append((i, cells[columns[0]], cells[columns[1]], split or None))
    return rows


def _manifest_classes(path: Path, labels: list[object]) -> tuple[list[str], dict[object, int]]:
    """(class names by label, {label value: label}) from classnames.txt beside the manifest or the labels."""
    names_file = path.parent / CLASSNAMES
    names = (
        [line.strip() for line in names_file.read_text().splitlines() if line.strip()] if names_file.is_file() else None
    )
    as_int = [_int(v) for v in labels]
    if all(v is not None for v in as_int):  # integer labels index classnames.txt
        if names is None:
            raise ClipAdaptError(
                f"{path} has integer labels, so it needs {names_file}: one class name per line, line i = label i"
            )
        bad = sorted({v for v in as_int if not 0 <= v < len(names)})
        if bad:
            raise ClipAdaptError(
                f"{path}: unknown label(s) {_first([str(b) for b in bad])}: {names_file} has {len(names)} class "
                f"names, so labels are 0..{len(names) - 1}"
            )
        return names, {v: int(v) for v in labels}  # both the raw value and its int map to the label
    if names is None:
        names = sorted({str(v) for v in labels})
    unknown = sorted({str(v) for v in labels} - set(names))
    if unknown:
        raise ClipAdaptError(
            f"{path}: unknown label(s) {_first([repr(u) for u in unknown])}, not a line of {names_file}: add them "
            "there or fix the manifest"
        )
    return names, {name: i for i, name in enumerate(names)}


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lstrip("-").isdigit():
        return int(value)
    return None


def read_manifest(root: str | os.PathLike) -> dict[str, list[Datum]]:
    """The manifest's rows as train/val/test lists of Datum (its split column, or the fixed 50/20/30 split)."""
    path = manifest_path(root)
    rows = _manifest_rows(path)
    if not rows:
        raise ClipAdaptError(f"manifest {path} lists no images")
    for i, _, label, _ in rows:
        if isinstance(label, bool) or not isinstance(label, (str, int)) or label == "":
            raise ClipAdaptError(f"{path}, row {i}: label {label!r} is neither a class name nor an integer")
    names, label_of = _manifest_classes(path, [label for _, _, label, _ in rows])
    seen: dict[str, int] = {}
    duplicates, missing, items = [], [], []
    for i, rel, label, split in rows:
        if not isinstance(rel, str) or not rel:
            raise ClipAdaptError(f"{path}, row {i}: empty or non-text path {rel!r}")
        full = os.path.normpath(os.path.join(path.parent, os.path.expanduser(rel)))
        if full in seen:
            duplicates.append(f"{rel} (rows {seen[full]} and {i})")
        seen.setdefault(full, i)
        if not os.path.isfile(full):
            missing.append(full)
        if split is not None and split not in SPLITS:
            raise ClipAdaptError(f"{path}, row {i}: split {split!r} is not one of train, val, test")
        index = label_of[label] if label in label_of else label_of[str(label)]
        items.append((Datum(full, index, names[index]), split))
    if duplicates:
        raise ClipAdaptError(f"{path} lists {len(duplicates)} path(s) twice: {_first(duplicates)}; keep one row each")
    if missing:
        raise ClipAdaptError(
            f"{path}: {len(missing)} of {len(rows)} image files are missing (first: {_first(missing)}); "
            "relative paths are relative to the manifest's folder"
        )
    empty = [repr(name) for label, name in enumerate(names) if label not in {d.label for d, _ in items}]
    if empty:
        raise ClipAdaptError(
            f"{path}: {len(empty)} class(es) of {path.parent / CLASSNAMES} have no image: {_first(empty)}; "
            "add rows for them or remove their lines"
        )
    given = [split for _, split in items if split is not None]
    if given and len(given) != len(items):
        raise ClipAdaptError(f"{path}: {len(items) - len(given)} row(s) have no split; give one on every row or none")
    if given:
        return {s: [d for d, split in items if split == s] for s in SPLITS}
    groups: dict[str, list[str]] = {}
    for d, _ in items:
        groups.setdefault(str(d.label), []).append(d.path)
    return split_by_ratio(groups, {str(i): i for i in range(len(names))}, {str(i): n for i, n in enumerate(names)})


# ---- for messages ----


def split_origin(root: str | os.PathLike, reader: str) -> str:
    """Where the split comes from, for `data check` and the datamodule's messages."""
    path = absolute_root(root)
    if reader == "manifest":
        source = manifest_path(root)
        return f"{source}" + ("" if _has_split_column(source) else " (no split column: 50/20/30 per class, fixed seed)")
    if (path / "train").is_dir():
        return f"{path}/{{train,val,test}}/<class>/"
    return f"{path}/<class>/ (one folder: 50/20/30 per class, fixed seed)"


def _has_split_column(path: Path) -> bool:
    try:
        return any(split is not None for _, _, _, split in _manifest_rows(path))
    except ClipAdaptError:
        return False
