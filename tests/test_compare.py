"""`clipadapt report --compare`: several methods in one table per protocol (rows = methods), by hand."""

import json
from pathlib import Path

import pytest
import yaml

from clipadapt import cli, experiments
from clipadapt.experiments import Result

TARGETS = ("caltech101", "dtd")


def run(method: str, protocol: str, dataset: str, seed: int, shots: int = 16, **accs: float) -> Result:
    return Result(method, protocol, dataset, shots, seed, {f"test/{k}/acc": v for k, v in accs.items()})


def test_fewshot_rows_are_methods_and_columns_datasets_with_gaps() -> None:
    results = [
        run("coop", "fewshot", "dtd", 1, dtd=50.0),
        run("coop", "fewshot", "dtd", 2, dtd=60.0),
        run("coop", "fewshot", "eurosat", 1, eurosat=80.0),
        run("kgcoop", "fewshot", "dtd", 1, dtd=70.0),  # no eurosat run
        run("kgcoop", "fewshot", "dtd", 1, shots=4, dtd=1.0),  # another shot count: another table
    ]
    four, sixteen = experiments.comparison_tables(results)
    assert sixteen["columns"] == ["dtd", "eurosat", "Average (2)"] and "16 shots" in sixteen["title"]
    rows = dict(sixteen["rows"])
    assert rows["coop"] == [(55.0, 5.0), (80.0, 0.0), 67.5]
    assert rows["kgcoop"] == [(70.0, 0.0), None, None]  # a gap, and no average over it
    assert list(dict(four["rows"])) == ["kgcoop"]
    (only,) = experiments.comparison_tables(results[:4], ["kgcoop", "coop", "absent"])
    assert [label for label, _ in only["rows"]] == ["kgcoop", "coop"]  # the asked order; unknown names skipped


def test_base2novel_gives_base_novel_and_hm_tables() -> None:
    results = [
        run("coop", "base2novel", "dtd", 1, base=80.0, novel=40.0),
        run("coop", "base2novel", "dtd", 2, base=60.0, novel=80.0),
        run("coop", "base2novel", "eurosat", 1, base=90.0, novel=30.0),
        run("maple", "base2novel", "dtd", 1, base=70.0, novel=70.0),
    ]
    base, novel, hm = experiments.comparison_tables(results)
    assert [t["title"].split("—")[1].split("(")[0].strip() for t in (base, novel, hm)] == [
        "base-to-novel Base",
        "base-to-novel Novel",
        "base-to-novel HM",
    ]
    assert dict(base["rows"])["coop"] == [(70.0, 10.0), (90.0, 0.0), 80.0]
    assert dict(novel["rows"])["coop"] == [(60.0, 20.0), (30.0, 0.0), 45.0]
    coop_hm = dict(hm["rows"])["coop"]
    assert coop_hm[0] == pytest.approx(2 * 70 * 60 / 130)  # of the seed-averaged B and N
    assert coop_hm[2] == pytest.approx(2 * 80 * 45 / 125)  # of the averaged B and N, as the papers print it
    assert dict(hm["rows"])["maple"] == [70.0, None, None]


def test_base2novel_with_another_test_set_gives_its_table_too() -> None:
    """The toy world's pretraining domain beside base / novel: a fourth table (what each method forgot)."""
    assert experiments.protocol_name({"dataset": "toy_dusk", "eval_sets": ["base", "novel", "toy"]}) == "base2novel"
    results = [
        run("coop", "base2novel", "toy_dusk", 1, base=80.0, novel=40.0, toy=90.0),
        run("coop", "base2novel", "toy_dusk", 2, base=60.0, novel=80.0, toy=80.0),
        run("kgcoop", "base2novel", "toy_dusk", 1, base=70.0, novel=70.0),  # no toy accuracy: a gap
    ]
    *_, toy = experiments.comparison_tables(results)
    assert "toy accuracy" in toy["title"] and toy["columns"] == ["toy_dusk", "Average (1)"]
    assert dict(toy["rows"]) == {"coop": [(85.0, 5.0), 85.0], "kgcoop": [None, None]}


def test_cross_dataset_and_ood_average_the_targets_only() -> None:
    results = [
        run("cocoop", "crossdataset", "imagenet", 1, imagenet=70.0, caltech101=90.0, dtd=40.0),
        run("cocoop", "crossdataset", "imagenet", 2, imagenet=72.0, caltech101=92.0, dtd=44.0),
        run("maple", "crossdataset", "imagenet", 1, imagenet=71.0, caltech101=93.0),  # dtd missing
    ]
    ood_accs = {"imagenet": 70.0, "imagenet_v2": 60.0, "imagenet_sketch": 50.0, "imagenet_a": 40.0, "imagenet_r": 80.0}
    results.append(run("cocoop", "ood", "imagenet", 1, **ood_accs))
    xd, ood = experiments.comparison_tables(results)
    assert xd["columns"] == ["imagenet", "caltech101", "dtd", "Average (2)"]
    rows = dict(xd["rows"])
    assert rows["cocoop"] == [(71.0, 1.0), (91.0, 1.0), (42.0, 2.0), 66.5]  # the source is not averaged
    assert rows["maple"][-1] is None
    assert ood["columns"] == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r", "Average (4)"]
    assert dict(ood["rows"])["cocoop"][-1] == 57.5
    (alone,) = experiments.tables(results[:2])  # the per-method report shows a cross-dataset run the same way
    assert alone["columns"] == xd["columns"] and dict(alone["rows"])["cocoop"] == rows["cocoop"]


def test_protocol_of_a_cross_dataset_config() -> None:
    assert experiments.protocol_name({"dataset": "imagenet", "eval_sets": ["all", *TARGETS]}) == "crossdataset"
    assert experiments.protocol_name({"dataset": "ImageNet", "eval_sets": ["imagenet", "all"]}) == "fewshot"
    config = experiments.merged_config([str(Path(__file__).parents[1] / "configs" / "maple_crossdataset.yaml")], [])
    assert experiments.protocol_name(config["data"]) == "crossdataset"  # its own run folders, not fewshot's


def test_report_compare_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for method, acc in (("coop", 60.0), ("kgcoop", 70.0)):
        for seed in (1, 2):
            folder = tmp_path / f"runs/{method}/fewshot/dtd/shots_16/seed_{seed}"
            folder.mkdir(parents=True)
            data = {"dataset": "dtd", "num_shots": 16, "seed": seed}
            (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": "x.Y"}, "data": data}))
            (folder / "test_metrics.json").write_text(json.dumps({"test/dtd/acc": acc + seed}))
    cli.main(["report", str(tmp_path / "runs"), "--compare", "kgcoop", "coop"])
    out = capsys.readouterr().out
    assert "| kgcoop | 71.50 ± 0.50 | 71.50 |" in out and out.index("| kgcoop") < out.index("| coop")
    (csv_file,) = (tmp_path / "runs").glob("methods_compared*.csv")
    assert "coop" in csv_file.read_text()
    cli.main(["report", str(tmp_path / "runs")])  # without the flag: one table per method, as before
    assert "### coop — fewshot accuracy (%)" in capsys.readouterr().out
