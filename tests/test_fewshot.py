"""Few-shot draw (Dassl-exact), base/novel split and the few-shot caches."""

import json
import os
import pickle
import random
import sys
import types
import warnings
from collections import defaultdict

import pytest

from clipadapt.data import write_synthetic
from clipadapt.data.fewshot import (
    draw_few_shot,
    few_shot_splits,
    load_few_shot,
    read_dassl_cache,
    subsample_classes,
    subsample_labels,
)
from clipadapt.data.readers import Datum, dataset_dir, read_splits


def dassl_draw(train: list, val: list, num_shots: int, seed: int) -> tuple[list, list]:
    """Independent re-statement of Dassl's generate_fewshot_dataset after set_random_seed(seed)."""
    state = random.getstate()
    try:
        random.seed(seed)  # the module-level generator, as Dassl uses it
        out = []
        for items, k in ((train, num_shots), (val, min(num_shots, 4))):
            tracker = defaultdict(list)
            for item in items:
                tracker[item.label].append(item)
            dataset = []
            for _, group in tracker.items():
                dataset.extend(random.sample(group, k) if len(group) >= k else group)
            out.append(dataset)
        return out[0], out[1]
    finally:
        random.setstate(state)


def uneven_items(num_classes: int = 7, seed: int = 0) -> list[Datum]:
    """Items with uneven class sizes, interleaved so that first appearance differs from label order."""
    rng = random.Random(seed)
    items = [Datum(f"/d/{c}/{i}.jpg", c, f"class_{c}") for c in range(num_classes) for i in range(10 + 3 * c)]
    rng.shuffle(items)
    return items


@pytest.mark.parametrize("seed", [1, 2, 3, 17])
@pytest.mark.parametrize("num_shots", [1, 2, 4, 8, 16])
def test_draw_matches_dassl(seed: int, num_shots: int) -> None:
    train, val = uneven_items(7, seed=0), uneven_items(5, seed=1)
    with pytest.warns(UserWarning) if num_shots == 16 else warnings.catch_warnings():
        if num_shots != 16:
            warnings.simplefilter("error")  # every class is large enough: no warning
        ours = few_shot_splits(train, val, num_shots, seed)
    assert ours == dassl_draw(train, val, num_shots, seed)
    assert all(len([d for d in ours[1] if d.label == c]) == min(num_shots, 4) for c in range(5))


def test_draw_on_split_file_matches_dassl(tmp_path) -> None:
    write_synthetic(tmp_path, "oxford_pets", num_classes=5, train_per_class=9, val_per_class=6)
    splits = read_splits(tmp_path, "oxford_pets")
    for seed in (1, 2, 3):
        for k in (1, 4, 8):
            assert few_shot_splits(splits["train"], splits["val"], k, seed) == dassl_draw(
                splits["train"], splits["val"], k, seed
            )


def test_draw_leaves_global_random_alone() -> None:
    random.seed(123)
    expected = random.random()
    random.seed(123)
    few_shot_splits(uneven_items(), [], 4, seed=1)
    assert random.random() == expected


def test_draw_deterministic_per_seed_and_differs_across_seeds() -> None:
    train = uneven_items()
    a1, _ = few_shot_splits(train, [], 4, seed=1)
    a2, _ = few_shot_splits(train, [], 4, seed=1)
    b, _ = few_shot_splits(train, [], 4, seed=2)
    assert a1 == a2
    assert a1 != b
    assert len(a1) == len(b) == 7 * 4


def test_draw_groups_in_first_appearance_order() -> None:
    items = [Datum("a", 2, "c2"), Datum("b", 0, "c0"), Datum("c", 2, "c2"), Datum("d", 1, "c1"), Datum("e", 0, "c0")]
    drawn = draw_few_shot(items, 1, random.Random(0))
    assert [d.label for d in drawn] == [2, 0, 1]


def test_small_class_warns_and_keeps_all() -> None:
    items = [Datum(f"{c}-{i}", c, str(c)) for c in range(3) for i in range(5 if c else 2)]
    with pytest.warns(UserWarning, match="1 of 3 classes have fewer than 4 images"):
        drawn = draw_few_shot(items, 4, random.Random(1))
    assert [d.label for d in drawn].count(0) == 2
    assert [d.label for d in drawn].count(1) == 4


def test_non_positive_shots_is_full_split() -> None:
    train, val = uneven_items(), uneven_items(3)
    assert few_shot_splits(train, val, 0, seed=1) == (train, val)
    assert few_shot_splits(train, val, -1, seed=1) == (train, val)


def test_base_novel_hand_checked() -> None:
    # 5 classes with gaps in the labels: sorted [2, 5, 7, 9, 11], m = ceil(5 / 2) = 3.
    train = [Datum(f"t{y}", y, f"n{y}") for y in (9, 2, 11, 5, 7, 2)]
    test = [Datum(f"x{y}", y, f"n{y}") for y in (11, 7, 2, 9, 5, 13)]  # 13 is not a train class: dropped
    splits = {"train": train, "val": [], "test": test}
    assert subsample_labels([d.label for d in train], "base") == [2, 5, 7]
    assert subsample_labels([d.label for d in train], "novel") == [9, 11]
    base = subsample_classes(splits, "base")
    assert [(d.path, d.label) for d in base["train"]] == [("t2", 0), ("t5", 1), ("t7", 2), ("t2", 0)]
    assert [(d.path, d.label, d.classname) for d in base["test"]] == [("x7", 2, "n7"), ("x2", 0, "n2"), ("x5", 1, "n5")]
    novel = subsample_classes(splits, "new")  # Dassl's spelling
    assert [(d.path, d.label) for d in novel["train"]] == [("t9", 0), ("t11", 1)]
    assert [(d.path, d.label) for d in novel["test"]] == [("x11", 1), ("x9", 0)]
    assert novel["val"] == []
    assert subsample_classes(splits, "all") == splits


def test_base_novel_are_halves_of_the_given_class_list() -> None:
    # Class 1 has no train image. CoOp's default halves the train labels [0, 2, 3] (base [0, 2]); the
    # datamodule passes the whole list [0, 1, 2, 3], whose base is [0, 1], so label 2 stays novel.
    splits = {
        "train": [Datum(f"t{y}", y, f"n{y}") for y in (0, 2, 3)],
        "test": [Datum(f"x{y}", y, f"n{y}") for y in (3, 2, 1, 0)],
    }
    assert [(d.path, d.label) for d in subsample_classes(splits, "base")["test"]] == [("x2", 1), ("x0", 0)]
    base = subsample_classes(splits, "base", range(4))
    assert [(d.path, d.label) for d in base["test"]] == [("x1", 1), ("x0", 0)]
    assert [(d.path, d.label) for d in base["train"]] == [("t0", 0)]
    novel = subsample_classes(splits, "novel", range(4))
    assert [(d.path, d.label) for d in novel["test"]] == [("x3", 1), ("x2", 0)]


def test_base_novel_even_and_from_first_non_empty_split() -> None:
    assert subsample_labels(range(4), "base") == [0, 1] and subsample_labels(range(4), "novel") == [2, 3]
    only_test = {"train": [], "test": [Datum(str(y), y, str(y)) for y in (3, 0, 1)]}
    assert [d.label for d in subsample_classes(only_test, "novel")["test"]] == [0]  # labels [0, 1, 3]: novel = [3]
    with pytest.raises(ValueError, match="all, base, novel"):
        subsample_classes(only_test, "old")


@pytest.fixture
def dassl(monkeypatch) -> types.ModuleType:
    """A module whose `Datum` pickles under Dassl's module path, like real Dassl caches."""
    module = types.ModuleType("dassl.data.datasets.base_dataset")

    class Datum:  # mirrors Dassl's attribute names
        def __init__(self, impath: str, label: int, classname: str) -> None:
            self._impath, self._label, self._domain, self._classname = impath, label, 0, classname

    Datum.__module__, Datum.__qualname__ = module.__name__, "Datum"
    module.Datum = Datum
    for name in ("dassl", "dassl.data", "dassl.data.datasets"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return module


def test_reads_dassl_pickle_with_foreign_absolute_paths(tmp_path, monkeypatch, dassl) -> None:
    write_synthetic(tmp_path, "oxford_pets", num_classes=4, train_per_class=6, val_per_class=5)
    splits = read_splits(tmp_path, "oxford_pets")
    folder = dataset_dir(tmp_path, "oxford_pets")
    # A draw that our own seed-1 draw would not give: the last k items of each class.
    custom_train = [d for c in range(4) for d in [x for x in splits["train"] if x.label == c][-2:]]
    custom_val = [d for c in range(4) for d in [x for x in splits["val"] if x.label == c][-2:]]
    module = dassl

    def foreign(d: Datum) -> object:  # written on another machine under /old/DATA
        return module.Datum(d.path.replace(str(tmp_path), "/old/DATA"), d.label, d.classname)

    (folder / "split_fewshot").mkdir()
    with open(folder / "split_fewshot" / "shot_2-seed_1.pkl", "wb") as f:
        pickle.dump({"train": [foreign(d) for d in custom_train], "val": [foreign(d) for d in custom_val]}, f)
    monkeypatch.delitem(sys.modules, module.__name__)  # reading must not need Dassl
    got = load_few_shot(splits["train"], splits["val"], 2, 1, folder, "oxford_pets", tmp_path / "cache")
    assert got == (custom_train, custom_val)
    # Another seed has no pkl: our own draw, recorded outside the dataset folder.
    drawn = load_few_shot(splits["train"], splits["val"], 2, 2, folder, "oxford_pets", tmp_path / "cache")
    assert drawn == few_shot_splits(splits["train"], splits["val"], 2, 2)
    record = json.loads((tmp_path / "cache" / "oxford_pets" / "shot_2-seed_2.json").read_text())
    assert record["train"] == [d.path[len(str(folder)) + 1 :] for d in drawn[0]]
    assert sorted(p.name for p in (folder / "split_fewshot").iterdir()) == ["shot_2-seed_1.pkl"]


def test_dassl_pickle_that_does_not_fit_is_ignored(tmp_path, dassl) -> None:
    write_synthetic(tmp_path, "dtd", num_classes=3, train_per_class=4, val_per_class=2)
    splits = read_splits(tmp_path, "dtd")
    folder = dataset_dir(tmp_path, "dtd")
    module = dassl
    (folder / "split_fewshot").mkdir()
    with open(folder / "split_fewshot" / "shot_1-seed_1.pkl", "wb") as f:
        pickle.dump({"train": [module.Datum("/x/dtd/images/gone.jpg", 0, "a")], "val": []}, f)
    got = load_few_shot(splits["train"], splits["val"], 1, 1, folder, "dtd", tmp_path / "cache")
    assert got == few_shot_splits(splits["train"], splits["val"], 1, 1)


def test_record_is_rewritten_for_another_split(tmp_path) -> None:
    # Same dataset name, different roots (as in tests): the record follows the split actually drawn.
    for sub, n in (("a", 3), ("b", 4)):
        write_synthetic(tmp_path / sub, "synthetic", num_classes=n, train_per_class=3, val_per_class=2)
        splits = read_splits(tmp_path / sub, "synthetic")
        folder = dataset_dir(tmp_path / sub, "synthetic")
        got = load_few_shot(splits["train"], splits["val"], 2, 1, folder, "synthetic", tmp_path / "cache")
        assert got == few_shot_splits(splits["train"], splits["val"], 2, 1)
        record = json.loads((tmp_path / "cache" / "synthetic" / "shot_2-seed_1.json").read_text())
        assert len(record["train"]) == 2 * n


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_dassl_pickle_protocols_and_foreign_classes(tmp_path, dassl, protocol) -> None:
    write_synthetic(tmp_path, "eurosat", num_classes=2, train_per_class=3, val_per_class=1)
    splits = read_splits(tmp_path, "eurosat")
    folder = dataset_dir(tmp_path, "eurosat")
    cache = folder / "split_fewshot" / "shot_1-seed_5.pkl"
    cache.parent.mkdir()
    chosen = [splits["train"][0], next(d for d in splits["train"] if d.label != splits["train"][0].label)]
    payload = {"train": [dassl.Datum(d.path, d.label, d.classname) for d in chosen], "val": list(splits["val"])}
    payload["val"] = [dassl.Datum(d.path, d.label, d.classname) for d in splits["val"]]
    cache.write_bytes(pickle.dumps(payload, protocol=protocol))
    assert read_dassl_cache(cache, folder, splits["train"], splits["val"]) == (chosen, splits["val"])
    # Anything but Dassl's Datum and plain containers is refused: unpickling would run it.
    cache.write_bytes(pickle.dumps({"train": [os.getcwd], "val": []}, protocol=protocol))
    assert read_dassl_cache(cache, folder, splits["train"], splits["val"]) is None
