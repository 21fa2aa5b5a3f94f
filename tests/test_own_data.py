"""The user's own data: `imagefolder` and `manifest` read into the CoOp readers' item lists, with one-line errors."""

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml
from test_cli import CONFIGS, REPO, TINY_FLAGS, is_test_only, run_dirs

from clipadapt.cli import main
from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.data.own import split_by_ratio
from clipadapt.data.readers import Datum, class_names, read_splits
from clipadapt.errors import ClipAdaptError

CLASSES = 4  # synthetic_classnames(4): every other name has an underscore


def synthetic_items(root: Path, per_class: int = 10) -> list[Datum]:
    """Learnable synthetic images (their class in their pixels) to arrange into the user's layouts."""
    write_synthetic(
        root, "synthetic", num_classes=CLASSES, train_per_class=per_class, val_per_class=0, test_per_class=0
    )
    return read_splits(root, "synthetic")["train"]


def write_imagefolder(root: Path, items: list[Datum], splits: bool = False) -> Path:
    """ROOT/<class>/<image> (splits=False) or ROOT/<split>/<class>/<image>, 60/20/20 of each class."""
    out = root / "mine"
    for i, d in enumerate(items):
        split = ("train", "train", "train", "val", "test")[i % 5] if splits else ""
        target = out / split / d.classname / Path(d.path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(d.path, target)
    return out


def write_manifest(root: Path, items: list[Datum], split_column: bool = True, suffix: str = "csv") -> Path:
    """images/<file> + manifest.<suffix> with relative paths and class-name labels (+ a split column)."""
    out = root / "manifest_data"
    (out / "images").mkdir(parents=True)
    rows = []
    for i, d in enumerate(items):
        shutil.copy(d.path, out / "images" / Path(d.path).name)
        rows.append(
            {"path": f"images/{Path(d.path).name}", "label": d.classname}
            | ({"split": ("train", "train", "train", "val", "test")[i % 5]} if split_column else {})
        )
    path = out / f"manifest.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        header = list(rows[0])
        path.write_text(",".join(header) + "\n" + "".join(",".join(r[k] for k in header) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> list[Datum]:
    return synthetic_items(tmp_path_factory.mktemp("synthetic"))


def test_split_by_ratio_is_dassls_50_20_30_per_class() -> None:
    groups = {"b": [f"b{i}" for i in range(10)], "a": [f"a{i}" for i in range(4)]}
    splits = split_by_ratio(groups, {"a": 0, "b": 1}, {"a": "A", "b": "B"}, seed=3)
    # a: round(2.0)=2 / round(0.8)=1 / 1; b: 5 / 2 / 3, classes in label order (a first)
    assert [(d.label, d.classname) for d in splits["train"]] == [(0, "A")] * 2 + [(1, "B")] * 5
    assert [len(splits[s]) for s in ("val", "test")] == [1 + 2, 1 + 3]
    rng = random.Random(3)  # one stream, shuffling class a then class b
    a, b = list(groups["a"]), list(groups["b"])
    rng.shuffle(a)
    rng.shuffle(b)
    assert [d.path for d in splits["train"]] == a[:2] + b[:5]
    assert [d.path for d in splits["test"]] == a[3:] + b[7:]
    with pytest.raises(ClipAdaptError, match=r"class 'C' has 3 image\(s\): too few .*4 or more"):
        split_by_ratio({"c": ["1", "2", "3"]}, {"c": 0}, {"c": "C"})


def test_imagefolder_one_folder_is_split_and_labelled_by_sorted_folders(items: list[Datum], tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, items)
    splits = read_splits(root, "imagefolder")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [CLASSES * 5, CLASSES * 2, CLASSES * 3]
    folders = sorted(p.name for p in root.iterdir())
    assert class_names(splits) == folders  # raw folder names; prompts turn "_" into spaces
    for split in splits.values():
        for d in split:
            assert Path(d.path).parent.name == folders[d.label] and Path(d.path).is_file()
    # the split is fixed by the files alone: not data.seed, not the listing order
    assert read_splits(root, "ImageFolder") == splits
    assert len({d.path for s in splits.values() for d in s}) == len(items)


def test_imagefolder_subfolders_and_classnames_txt(items: list[Datum], tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, items, splits=True)
    folders = sorted(p.name for p in (root / "train").iterdir())
    (root / "classnames.txt").write_text("".join(f"{f} the {f.replace('_', ' ')} thing\n" for f in folders))
    (root / "train" / folders[0] / "notes.txt").write_text("not an image: skipped")
    splits = read_splits(root, "imagefolder")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [CLASSES * 6, CLASSES * 2, CLASSES * 2]
    assert class_names(splits) == [f"the {f.replace('_', ' ')} thing" for f in folders]
    assert all(f"/{split}/" in d.path for split, ds in splits.items() for d in ds)
    # a class only test/ has keeps its label (sorted among every split's folders), so fit refuses it by name
    shutil.move(root / "train" / folders[-1], root / "test" / f"{folders[-1]}_extra")
    (root / "classnames.txt").write_text("".join(f"{f} {f}\n" for f in [*folders, f"{folders[-1]}_extra"]))
    assert class_names(read_splits(root, "imagefolder"))[-1] == f"{folders[-1]}_extra"


@pytest.mark.parametrize(
    ("arrange", "message"),
    [
        (lambda root: shutil.rmtree(root), r"image folder .*mine does not exist"),
        (lambda root: (root / "empty_class").mkdir(), r"1 empty class folder\(s\) in .*mine: empty_class"),
        (lambda root: (root / "x.jpg").write_bytes(b""), r"holds image files directly \(x\.jpg\)"),
        (lambda root: (root / "classnames.txt").write_text("blue_square blue\n"), r"classnames\.txt has no line for"),
        (lambda root: (root / "train").mkdir(), r"has train/, so it is read as train/ val/ test/.*also holds"),
    ],
)
def test_imagefolder_errors_are_one_line(items: list[Datum], tmp_path: Path, arrange, message: str) -> None:
    root = write_imagefolder(tmp_path, items)
    arrange(root)
    with pytest.raises(ClipAdaptError, match=message) as err:
        read_splits(root, "imagefolder")
    assert "\n" not in str(err.value)


def test_manifest_csv_with_split_column_keeps_row_order(items: list[Datum], tmp_path: Path) -> None:
    path = write_manifest(tmp_path, items)
    splits = read_splits(path, "manifest")
    assert read_splits(path.parent, "manifest") == splits  # the folder holding manifest.csv works too
    assert [len(splits[s]) for s in ("train", "val", "test")] == [CLASSES * 6, CLASSES * 2, CLASSES * 2]
    names = sorted({d.classname for d in items})  # no classnames.txt: the sorted label names
    assert class_names(splits) == names
    rows = path.read_text().splitlines()[1:]
    train_rows = [r.split(",") for r in rows if r.endswith(",train")]
    assert [(d.path, d.label) for d in splits["train"]] == [
        (str(path.parent / p), names.index(label)) for p, label, _ in train_rows
    ]


def test_manifest_json_integer_labels_and_ratio_split(items: list[Datum], tmp_path: Path) -> None:
    path = write_manifest(tmp_path, items, split_column=False, suffix="json")
    names = ["red circle", "blue square", "green stripe", "yellow ring"]  # classnames.txt fixes the order
    by_raw = {raw: i for i, raw in enumerate(sorted({d.classname for d in items}))}
    rows = json.loads(path.read_text())
    path.write_text(json.dumps([[r["path"], by_raw[r["label"]]] for r in rows]))
    (path.parent / "classnames.txt").write_text("\n".join(names) + "\n")
    splits = read_splits(path, "manifest")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [CLASSES * 5, CLASSES * 2, CLASSES * 3]
    assert class_names(splits) == names


def _rewrite(path: Path, edit) -> None:
    lines = path.read_text().splitlines()
    path.write_text("\n".join(edit(lines)) + "\n")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ls: [*ls, "images/nope.png,blue_square,train"], r"1 of \d+ image files are missing \(first: .*nope"),
        (lambda ls: [*ls, ls[1]], r"lists 1 path\(s\) twice: images/.* \(rows 2 and \d+\)"),
        (lambda ls: [ls[0], ls[1].replace(",train", ",training"), *ls[2:]], r"row 2: split 'training' is not one of"),
        (lambda ls: [ls[0], ls[1].rsplit(",", 1)[0] + ",", *ls[2:]], r"1 row\(s\) have no split"),
        (lambda ls: [*ls, "images/x.png,,train"], r"row \d+: label '' is neither a class name nor an integer"),
    ],
)
def test_manifest_errors_are_one_line(items: list[Datum], tmp_path: Path, edit, message: str) -> None:
    path = write_manifest(tmp_path, items)
    _rewrite(path, edit)
    with pytest.raises(ClipAdaptError, match=message) as err:
        read_splits(path, "manifest")
    assert "\n" not in str(err.value)


def test_manifest_label_errors(items: list[Datum], tmp_path: Path) -> None:
    path = write_manifest(tmp_path, items)
    (path.parent / "classnames.txt").write_text("blue_square\n")
    with pytest.raises(ClipAdaptError, match=r"unknown label\(s\) .*not a line of .*classnames\.txt"):
        read_splits(path, "manifest")
    _rewrite(path, lambda ls: [ls[0]] + [",".join([r.split(",")[0], "0", r.split(",")[2]]) for r in ls[1:]])
    (path.parent / "classnames.txt").unlink()
    with pytest.raises(ClipAdaptError, match=r"integer labels, so it needs .*classnames\.txt"):
        read_splits(path, "manifest")
    (path.parent / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(ClipAdaptError, match=r"class\(es\) of .*classnames\.txt have no image: 'b'"):
        read_splits(path, "manifest")
    _rewrite(path, lambda ls: [*ls, "images/x.png,7,test"])
    with pytest.raises(ClipAdaptError, match=r"unknown label\(s\) 7: .* so labels are 0\.\.1"):
        read_splits(path, "manifest")
    with pytest.raises(ClipAdaptError, match=r"holds neither of manifest\.csv and manifest\.json"):
        read_splits(tmp_path, "manifest")


def test_data_check_reports_classes_and_split_sizes(items: list[Datum], tmp_path: Path, capsys) -> None:
    folder = write_imagefolder(tmp_path / "a", items)
    main(["data", "check", "--root", str(folder), "--dataset", "imagefolder", "--num-shots", "2"])
    out = capsys.readouterr().out
    assert f"classes:  {CLASSES} (blue square, " in out and "one folder: 50/20/30" in out
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        assert f"{split + ':':9} {CLASSES * n} images" in out
    assert f"all {len(items)} decode" in out and "few-shot: 2 shots" in out
    manifest = write_manifest(tmp_path / "b", items)
    main(["data", "check", "--root", str(manifest), "--dataset", "manifest"])
    out = capsys.readouterr().out
    assert f"split:    {manifest}\n" in out and f"train:    {CLASSES * 6} images" in out
    (manifest.parent / "images" / Path(items[0].path).name).write_bytes(b"not an image")
    with pytest.raises(SystemExit, match="1 image.* cannot be decoded"):
        main(["data", "check", "--root", str(manifest), "--dataset", "manifest"])
    with pytest.raises(SystemExit, match=r"clipadapt data check: image folder .*nowhere does not exist"):
        main(["data", "check", "--root", str(tmp_path / "nowhere"), "--dataset", "imagefolder"])


def test_datamodule_reads_own_data_like_coop_data(items: list[Datum], tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, items)
    dm = CLIPDataModule(
        str(root), "imagefolder", num_shots=2, subsample="base", num_workers=0, cache_dir=str(tmp_path / "c")
    )
    assert dm.classnames == ["blue square", "green stripe"]  # base half, prompt-ready
    assert dm.templates == ["a photo of a {}."] and dm.eval_sets[0].name == "base"
    dm.setup("fit")
    assert len(dm.train_dataloader().dataset) == 2 * 2


# Every method config on the user's data: imagefolder and manifest alternate over the configs (each run costs
# a few seconds; both readers meet every kind of method), one epoch each. The CLI test runs every config on CoOp data in
# make test; this one, in make test-slow, shows that the user's data goes through the same paths.
OWN_RUNS = [(config, ("imagefolder", "manifest")[i % 2]) for i, config in enumerate(CONFIGS)]


@pytest.mark.slow  # ~90 s for all configs on a quiet machine: make test-slow (CI)
@pytest.mark.parametrize(("config", "dataset"), OWN_RUNS, ids=[f"{c.stem}-{d}" for c, d in OWN_RUNS])
def test_config_runs_on_own_data(config: Path, dataset: str, items: list[Datum], tmp_path: Path) -> None:
    spec = yaml.safe_load(config.read_text())
    # Cross-dataset and OOD configs name other datasets, which do not live in the user's root: own data only.
    eval_sets = [s if s in ("all", "base", "novel") else "all" for s in spec["data"].get("eval_sets") or []]
    root = write_imagefolder(tmp_path, items) if dataset == "imagefolder" else write_manifest(tmp_path, items)
    test_only = is_test_only(spec)
    main(
        ["test" if test_only else "fit"]
        + ["--config", str(config), "--config", str(REPO / "configs" / "tiny.yaml")]
        + ["--data.dataset", dataset, "--data.root", str(root), "--data.cache_dir", str(tmp_path / "cache")]
        + (["--data.eval_sets", json.dumps(list(dict.fromkeys(eval_sets)))] if eval_sets else [])
        + ["--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path), *TINY_FLAGS.get(config.stem, [])]
    )
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert any(k.endswith("/acc") for k in metrics)
    assert all(0 <= v <= 100 for k, v in metrics.items() if k.endswith("acc") or k == "test/hm")


def test_fit_on_bad_own_data_ends_in_one_line(items: list[Datum], tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, items)
    (root / "empty_class").mkdir()
    with pytest.raises(SystemExit, match=r"clipadapt: error: 1 empty class folder\(s\) in .*: empty_class") as err:
        main(
            ["fit", "--config", str(REPO / "configs" / "synthetic_probe.yaml"), "--data.dataset", "imagefolder"]
            + ["--data.root", str(root), "--trainer.default_root_dir", str(tmp_path)]
        )
    assert "\n" not in str(err.value.code)
