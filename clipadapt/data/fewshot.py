"""Few-shot draw (bit-exact with Dassl) and the base-to-novel class split.

Dassl's `generate_fewshot_dataset` after `random.seed(seed)`: group the items by label in order of
first appearance, take `random.sample(group, k)` per group (all of it when the group is smaller),
train with k shots first, then val with min(k, 4) from the same random stream. `random.Random(seed)`
has exactly the state `random.seed(seed)` gives the module-level generator, so a private generator
reproduces the draw without touching global state.

Base-to-novel (CoOp's `subsample_classes`): the sorted labels of the train split, first ceil(n/2)
are base and the rest novel; every split is filtered and relabelled 0..len-1 in sorted order.
Deliberate deviation: the datamodule passes the whole class list of the split file instead of the
labels its few-shot train split holds (Dassl's), so a class without train images cannot move the
base/novel boundary or shift the names of the classes after it. With every class in train (all
CoOp datasets) the two lists are the same, and so are the halves.

Caches: an existing Dassl cache `<dataset_dir>/split_fewshot/shot_K-seed_S.pkl` is read (without
Dassl) so published draws are reproduced exactly, e.g. ImageNet's, which depend on Dassl's unsorted
`os.listdir`; it is used only if every file in it maps onto the split on disk with the same label.
Our own draws are recorded as JSON of relative paths in a cache dir outside the data root (never
the dataset folder, which may be read-only), with a fingerprint of the split they were drawn from.
"""

import hashlib
import json
import logging
import math
import os
import pickle
import random
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from clipadapt.data.readers import Datum

__all__ = [
    "default_cache_dir",
    "draw_few_shot",
    "few_shot_splits",
    "load_few_shot",
    "read_dassl_cache",
    "subsample_classes",
    "subsample_labels",
]

log = logging.getLogger(__name__)

SUBSAMPLES = ("all", "base", "novel")


def draw_few_shot(items: Sequence[Datum], num_shots: int, rng: random.Random) -> list[Datum]:
    """K items per label, Dassl-exact: labels in order of first appearance, `rng.sample` per label."""
    if num_shots <= 0:
        return list(items)
    groups: dict[int, list[Datum]] = {}
    for item in items:
        groups.setdefault(item.label, []).append(item)
    drawn: list[Datum] = []
    short = []
    for label, group in groups.items():
        if len(group) >= num_shots:
            drawn += rng.sample(group, num_shots)
        else:  # Dassl keeps the whole class (its `repeat=False` path) and draws nothing from the stream
            drawn += group
            short.append((label, len(group)))
    if short:
        warnings.warn(
            f"{len(short)} of {len(groups)} classes have fewer than {num_shots} images "
            f"(smallest: {min(n for _, n in short)}); keeping all of their images (as Dassl does)",
            stacklevel=2,
        )
    return drawn


def few_shot_splits(
    train: Sequence[Datum], val: Sequence[Datum], num_shots: int, seed: int
) -> tuple[list[Datum], list[Datum]]:
    """Dassl's draw after `random.seed(seed)`: train with k shots, then val with min(k, 4); k <= 0: full splits."""
    if num_shots <= 0:
        return list(train), list(val)
    rng = random.Random(seed)
    few_train = draw_few_shot(train, num_shots, rng)
    few_val = draw_few_shot(val, min(num_shots, 4), rng)
    return few_train, few_val


def subsample_labels(labels: Iterable[int], subsample: str) -> list[int]:
    """The sorted labels kept by `subsample` ("all" | "base" | "novel", alias "new"); base = first ceil(n/2)."""
    mode = _mode(subsample)
    unique = sorted(set(labels))
    m = math.ceil(len(unique) / 2)
    return {"all": unique, "base": unique[:m], "novel": unique[m:]}[mode]


def subsample_classes(
    splits: dict[str, list[Datum]], subsample: str, labels: Iterable[int] | None = None
) -> dict[str, list[Datum]]:
    """Keep base or novel classes in every split and relabel them 0..len-1.

    The halves are taken of `labels` (the datamodule passes the whole class list); CoOp's default takes
    the labels of the train split (the first non-empty split if there is none).
    """
    if _mode(subsample) == "all":
        return {name: list(items) for name, items in splits.items()}
    if labels is None:
        source = splits.get("train") or next((items for items in splits.values() if items), [])
        labels = [d.label for d in source]
    relabel = {old: new for new, old in enumerate(subsample_labels(labels, subsample))}
    return {
        name: [d._replace(label=relabel[d.label]) for d in items if d.label in relabel]
        for name, items in splits.items()
    }


def _mode(subsample: str) -> str:
    mode = "novel" if subsample == "new" else subsample
    if mode not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of all, base, novel (or new), got {subsample!r}")
    return mode


# ---- caches ----


class _DasslDatum:
    """Stand-in for `dassl.data.datasets.base_dataset.Datum`; unpickling fills its __dict__."""

    _impath: str
    _label: int
    _classname: str


# Containers, plus what protocols 0/1 use to rebuild a plain object (`copyreg._reconstructor(cls, object, None)`).
_SAFE_GLOBALS = {
    ("collections", "OrderedDict"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "object"),
    ("copyreg", "_reconstructor"),
    ("copy_reg", "_reconstructor"),  # protocols 0-2 spell the module the Python 2 way
    ("__builtin__", "object"),
}


class _DasslUnpickler(pickle.Unpickler):
    """Unpickles Dassl's few-shot cache without Dassl and refuses any other class (pickle runs code)."""

    def find_class(self, module: str, name: str) -> type:
        if name == "Datum" and module.endswith("base_dataset"):
            return _DasslDatum
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a Dassl few-shot cache")


def _relative(path: str, root: Path) -> str | None:
    """`path` relative to the dataset folder, also for absolute paths written on another machine."""
    prefix = str(root) + os.sep
    if path.startswith(prefix):  # string test: this runs once per ImageNet image
        return path[len(prefix) :].replace(os.sep, "/")
    parts = Path(path).parts
    hits = [i for i, part in enumerate(parts) if part == root.name]
    return Path(*parts[hits[-1] + 1 :]).as_posix() if hits and hits[-1] + 1 < len(parts) else None


def read_dassl_cache(
    path: Path, folder: Path, train: Sequence[Datum], val: Sequence[Datum]
) -> tuple[list[Datum], list[Datum]] | None:
    """The draw stored in a Dassl `split_fewshot/*.pkl`, mapped onto our items; None if it does not fit them."""
    try:
        with open(path, "rb") as f:
            data = _DasslUnpickler(f).load()
    except Exception as err:  # any unreadable cache means "no cache", never a failed run
        log.warning("ignoring Dassl few-shot cache %s: %r", path, err)
        return None
    if not isinstance(data, dict) or "train" not in data or ("val" not in data and val):
        log.warning("ignoring Dassl few-shot cache %s: no train/val lists", path)
        return None
    ours = {_relative(d.path, folder): d for d in (*train, *val)}
    out = []
    for split in ("train", "val"):
        mapped = []
        for old in data.get(split, []):
            d = ours.get(_relative(str(getattr(old, "_impath", "")), folder))
            if d is None or d.label != getattr(old, "_label", None):
                entry = getattr(old, "__dict__", old)
                log.warning("ignoring Dassl few-shot cache %s: %r does not match the split on disk", path, entry)
                return None
            mapped.append(d)
        out.append(mapped)
    log.info("few-shot draw read from Dassl's cache %s", path)
    return out[0], out[1]


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/clipadapt/fewshot` (default `~/.cache/clipadapt/fewshot`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "clipadapt" / "fewshot"


def _fingerprint(train: Sequence[Datum], val: Sequence[Datum], folder: Path) -> str:
    h = hashlib.sha256()
    for split, items in (("train", train), ("val", val)):
        for d in items:
            h.update(f"{split}\t{_relative(d.path, folder)}\t{d.label}\t{d.classname}\n".encode())
    return h.hexdigest()


def load_few_shot(
    train: Sequence[Datum],
    val: Sequence[Datum],
    num_shots: int,
    seed: int,
    folder: Path,
    dataset: str,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[list[Datum], list[Datum]]:
    """`few_shot_splits`, or Dassl's pkl draw when one sits in the dataset folder; records our draw as JSON."""
    if num_shots <= 0:
        return list(train), list(val)
    dassl = folder / "split_fewshot" / f"shot_{num_shots}-seed_{seed}.pkl"
    if dassl.is_file():
        found = read_dassl_cache(dassl, folder, train, val)
        if found is not None:
            return found
    # Drawing costs milliseconds once the split is read, so the JSON is a record of the draw (which files,
    # from which split: the fingerprint), written for inspection and reuse; it is never trusted over the draw.
    few_train, few_val = few_shot_splits(train, val, num_shots, seed)
    record = {
        "dataset": dataset,
        "num_shots": num_shots,
        "seed": seed,
        "split_fingerprint": _fingerprint(train, val, folder),
        "train": [_relative(d.path, folder) for d in few_train],
        "val": [_relative(d.path, folder) for d in few_val],
    }
    cache = Path(os.path.expanduser(cache_dir)) if cache_dir else default_cache_dir()
    _write_record(cache / dataset / f"shot_{num_shots}-seed_{seed}.json", record)
    return few_train, few_val


def _write_record(path: Path, record: dict) -> None:
    try:
        if path.is_file() and json.loads(path.read_text()) == record:
            return
    except (OSError, ValueError):
        pass  # unreadable: rewrite it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so concurrent runs (DDP ranks) never read a half-written file.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(record, f, indent=0)
        os.replace(f.name, path)
    except OSError as err:  # a read-only home must not stop a run
        log.warning("could not write the few-shot record %s: %r", path, err)
