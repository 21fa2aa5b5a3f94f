"""Sweeps, reports and the cluster scripts: naming, resumption, tables equal to the per-run metrics."""

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from doubles import free_port

from clipadapt import cli, experiments
from clipadapt.data import write_synthetic
from clipadapt.experiments import Result

REPO = Path(__file__).resolve().parents[1]
TINY_SWEEP = ["--config", str(REPO / "configs" / "linear_probe_fewshot.yaml"), "--config", str(REPO / "configs" / "tiny.yaml")]  # fmt: skip


# ---- pure functions ----


def test_expand_names_every_point_and_keeps_grid_in_the_method_folder():
    runs = experiments.expand("clipast", "fewshot", ["dtd", "eurosat"], [1, 16], [1, 2, 3], {"a.top_k": ["2", "4"]})
    assert len(runs) == 2 * 2 * 2 * 3
    assert len({r.relpath() for r in runs}) == len(runs)
    assert runs[0].relpath() == Path("clipast-top_k_2/fewshot/dtd/shots_1/seed_1")
    assert [r.seed for r in runs[:3]] == [1, 2, 3]  # seeds innermost


def test_protocol_follows_the_data_flags(tmp_path: Path):
    assert experiments.protocol_name({"subsample": "all"}) == "fewshot"
    assert experiments.protocol_name({"subsample": "base", "eval_sets": ["base", "novel"]}) == "base2novel"
    assert experiments.protocol_name({"eval_sets": ["all", "imagenet_v2", "imagenet_r"]}) == "ood"
    config = experiments.merged_config([str(REPO / "configs" / "ast_base2novel.yaml")], ["--data.subsample", "all"])
    assert experiments.protocol_name(config["data"]) == "base2novel"  # eval_sets still [base, novel]
    config = experiments.merged_config(
        [str(REPO / "configs" / "ast_fewshot.yaml")], ["--data.eval_sets", "[all, imagenet_a]"]
    )
    assert (experiments.method_name(config), experiments.protocol_name(config["data"])) == ("clipast", "ood")


def test_parse_grid_rejects_a_key_without_values():
    assert experiments.parse_grid(["model.init_args.top_k=2,4"]) == {"model.init_args.top_k": ["2", "4"]}
    with pytest.raises(ValueError, match="KEY=V1"):
        experiments.parse_grid(["model.init_args.top_k"])


def result(dataset: str, shots: int, seed: int, protocol: str = "fewshot", **accs: float) -> Result:
    return Result("m", protocol, dataset, shots, seed, {f"test/{k}/acc": v for k, v in accs.items()})


def test_fewshot_table_mean_std_and_gaps_not_zeros():
    results = [
        result("dtd", 1, 1, dtd=50.0),
        result("dtd", 1, 2, dtd=60.0),
        result("dtd", 2, 1, dtd=70.0),
        result("eurosat", 1, 1, eurosat=80.0),  # eurosat 2 shots missing
    ]
    (table,) = experiments.tables(results)
    rows = dict(table["rows"])
    assert (table["kind"], table["columns"]) == ("fewshot", ["1 shot", "2 shots"])
    assert rows["dtd"] == [(55.0, 5.0), (70.0, 0.0)]
    assert rows["eurosat"] == [(80.0, 0.0), None]
    assert rows["Average (2)"] == [67.5, None]  # mean of the seed means; no average over a partial column
    markdown = experiments.to_markdown(table)
    assert "| dtd | 55.00 ± 5.00 | 70.00 ± 0.00 |" in markdown
    assert "| eurosat | 80.00 ± 0.00 |  |" in markdown
    assert "0.00 |\n" not in markdown.split("eurosat")[1].split("\n")[0]


def test_base2novel_hm_is_of_the_seed_averaged_accuracies():
    results = [
        result("dtd", 16, 1, "base2novel", base=80.0, novel=40.0),
        result("dtd", 16, 2, "base2novel", base=60.0, novel=80.0),
        result("eurosat", 16, 1, "base2novel", base=90.0, novel=30.0),
    ]
    (table,) = experiments.tables(results)
    rows = dict(table["rows"])
    assert rows["dtd"][0] == (70.0, 10.0) and rows["dtd"][1] == (60.0, 20.0)
    assert rows["dtd"][2] == pytest.approx(2 * 70 * 60 / 130)  # not the mean of the per-seed HMs (~58.67)
    base, novel = (70 + 90) / 2, (60 + 30) / 2
    assert rows["Average (2)"] == pytest.approx([base, novel, 2 * base * novel / (base + novel)])


def test_ood_table_averages_the_four_targets():
    accs = {"imagenet": 70.0, "imagenet_v2": 60.0, "imagenet_sketch": 50.0, "imagenet_a": 40.0, "imagenet_r": 80.0}
    (table,) = experiments.tables([result("imagenet", 16, 1, "ood", **accs)])
    ((label, cells),) = table["rows"]
    assert label == "16 shots" and cells[0] == (70.0, 0.0) and cells[-1] == 57.5
    cells_without_r = experiments.tables([result("imagenet", 16, 1, "ood", imagenet=1.0, imagenet_v2=2.0)])
    assert cells_without_r[0]["rows"][0][1][-1] is None


def write_run(run_dir: Path, data: dict, metrics: dict, class_path: str = "clipadapt.methods.rada.RAda") -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"class_path": class_path}, "data": data}))
    (run_dir / "test_metrics.json").write_text(json.dumps(metrics))


def test_report_reads_sweep_and_plain_run_folders(tmp_path: Path, capsys: pytest.CaptureFixture):
    b2n = {"subsample": "base", "eval_sets": ["base", "novel"], "num_shots": 16}
    for seed, (base, novel) in {1: (90.0, 50.0), 2: (70.0, 70.0)}.items():
        metrics = {"test/base/acc": base, "test/novel/acc": novel, "test/hm": 2 * base * novel / (base + novel)}
        run = tmp_path / f"runs/rada/base2novel/dtd/shots_16/seed_{seed}"
        write_run(run, b2n | {"dataset": "dtd", "seed": seed}, metrics)
    plain = tmp_path / "runs/lightning_logs/version_0"  # a `clipadapt fit` outside a sweep, CoOp spelling
    write_run(plain, b2n | {"dataset": "DescribableTextures", "seed": 3}, {"test/base/acc": 1.0}, "x.methods.Other")
    cli.main(["report", str(tmp_path / "runs")])
    assert "### rada — base-to-novel, 16 shots" in capsys.readouterr().out
    rows = {r["row"]: r for r in csv.DictReader((tmp_path / "runs/rada_base_to_novel_16_shots.csv").open())}
    assert (float(rows["dtd"]["Base"]), float(rows["dtd"]["Novel"])) == (80.0, 60.0)
    assert float(rows["dtd"]["HM"]) == pytest.approx(2 * 80 * 60 / 140, abs=1e-4)  # not the mean HM, 65.9
    assert rows["dtd"]["HM std"] == ""
    other = {r["row"]: r for r in csv.DictReader((tmp_path / "runs/other_base_to_novel_16_shots.csv").open())}
    assert float(other["dtd"]["Base"]) == 1.0 and other["dtd"]["Novel"] == "" and other["dtd"]["HM"] == ""


def grid_run(value: int, dataset: str, seed: int, val: float | None, test: float, shots: int = 16) -> Result:
    metrics = {f"test/{dataset}/acc": test} | ({} if val is None else {"val/acc": val})
    return Result(f"adapt-target_length_{value}", "fewshot", dataset, shots, seed, metrics)


def test_select_by_val_picks_the_best_seed_mean_val_and_reports_its_test():
    results = [
        # dtd: 64 has the better seed-mean val (70 vs 65) though 128 has the better test: 64 is chosen.
        grid_run(64, "dtd", 1, val=80.0, test=50.0),
        grid_run(64, "dtd", 2, val=60.0, test=54.0),
        grid_run(128, "dtd", 1, val=70.0, test=90.0),
        grid_run(128, "dtd", 2, val=60.0, test=90.0),
        # eurosat: a tie (75 each) goes to the first value in natural order, 64 (not "128" < "64" as text).
        grid_run(64, "eurosat", 1, val=75.0, test=40.0),
        grid_run(128, "eurosat", 1, val=75.0, test=99.0),
        Result("adapt", "fewshot", "dtd", 16, 1, {"test/dtd/acc": 1.0, "val/acc": 100.0}),  # no grid value
    ]
    choices = experiments.choose_by_val(results)
    assert choices == {
        ("adapt", "fewshot", "dtd", 16): "target_length_64",
        ("adapt", "fewshot", "eurosat", 16): "target_length_64",
    }
    chosen, accuracy = experiments.selection_tables(results)
    assert chosen["kind"] == "choice" and dict(chosen["rows"]) == {
        "dtd": ["target_length_64"],
        "eurosat": ["target_length_64"],
    }
    assert accuracy["title"] == "adapt (best val) — fewshot accuracy (%)"
    rows = dict(accuracy["rows"])
    assert rows["dtd"] == [(52.0, 2.0)] and rows["eurosat"] == [(40.0, 0.0)]  # test mean ± std of the choice
    assert rows["Average (2)"] == [46.0]
    assert "| dtd | target_length_64 |" in experiments.to_markdown(chosen)
    assert "target_length_64" in experiments.to_csv(chosen)


def test_select_by_val_leaves_a_cell_of_a_partial_grid_empty():
    results = [
        grid_run(64, "dtd", 1, val=80.0, test=50.0),
        grid_run(64, "dtd", 2, val=80.0, test=50.0),
        grid_run(128, "dtd", 1, val=90.0, test=60.0),  # seed 2 of 128 is missing
        grid_run(64, "eurosat", 1, val=None, test=40.0),  # ran without validation
        grid_run(128, "eurosat", 1, val=70.0, test=45.0),
        grid_run(64, "ucf101", 1, val=70.0, test=30.0),  # 128 never ran on ucf101
        grid_run(64, "caltech101", 1, val=50.0, test=70.0),
        grid_run(128, "caltech101", 1, val=60.0, test=80.0),
    ]
    choices = experiments.choose_by_val(results)
    assert [choices[("adapt", "fewshot", d, 16)] for d in ("dtd", "eurosat", "ucf101")] == [None] * 3
    assert choices[("adapt", "fewshot", "caltech101", 16)] == "target_length_128"
    chosen, accuracy = experiments.selection_tables(results)
    assert dict(chosen["rows"])["dtd"] == [None]
    rows = dict(accuracy["rows"])
    assert rows["caltech101"] == [(80.0, 0.0)] and rows["dtd"] == [None] and rows["ucf101"] == [None]
    assert rows["Average (4)"] == [None]  # never an average over the decided cells only


def test_report_select_by_val_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture):
    data = {"subsample": "all", "num_shots": 16, "dataset": "dtd"}
    for value, val, test in ((64, 60.0, 70.0), (128, 80.0, 65.0)):
        for seed in (1, 2):
            run = tmp_path / f"runs/adapt-target_length_{value}/fewshot/dtd/shots_16/seed_{seed}"
            write_run(run, data | {"seed": seed}, {"test/dtd/acc": test + seed, "val/acc": val}, "x.Adapt")
    cli.main(["report", str(tmp_path / "runs"), "--select-by", "val"])
    out = capsys.readouterr().out
    assert "| dtd | target_length_128 |" in out
    assert "### adapt (best val) — fewshot accuracy (%)" in out and "| dtd | 66.50 ± 0.50 |" in out
    assert (tmp_path / "runs/adapt_best_val_fewshot_accuracy.csv").is_file()

    plain = tmp_path / "plain"
    write_run(plain / "lightning_logs/version_0", data | {"seed": 1}, {"test/dtd/acc": 1.0}, "x.Adapt")
    with pytest.raises(SystemExit, match="found no grid runs"):
        cli.main(["report", str(plain), "--select-by", "val"])


# ---- the real sweep on the tiny model ----


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 datasets x 2 shots x 2 seeds, interrupted after 3 runs and resumed."""
    tmp = tmp_path_factory.mktemp("sweep")
    for name in ("oxford_pets", "dtd"):
        write_synthetic(tmp / "data", name)
    argv = TINY_SWEEP + ["--datasets", "oxford_pets", "dtd", "--shots", "1", "2", "--seeds", "1", "2"]
    argv += ["--out", str(tmp / "runs"), "--data.root", str(tmp / "data"), "--data.cache_dir", str(tmp / "cache")]
    real_main, calls = cli.main, []

    def interrupted() -> None:
        args = sys.argv[1:]  # the sweep runs each point as `clipadapt fit ...` in this process
        calls.append(args)
        if len(calls) == 4:  # killed mid-run: a folder without metrics is left behind
            run_dir = Path(args[args.index("--trainer.default_root_dir") + 1])
            run_dir.mkdir(parents=True)
            (run_dir / "config.yaml").write_text("partial: true\n")
            raise KeyboardInterrupt
        real_main()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "main", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cli.sweep_main(argv)
    assert len(list((tmp / "runs").rglob("test_metrics.json"))) == 3
    resumed = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "main", lambda: (resumed.append(sys.argv[1:]), real_main()))
        cli.sweep_main(argv)
    assert len(resumed) == 5, "finished runs were re-run, or unfinished ones skipped"
    assert calls[3] in resumed  # the interrupted point is redone from scratch
    return tmp


def test_sweep_runs_every_point_into_a_named_folder(sweep_dir: Path):
    finished = sorted(p.parent for p in (sweep_dir / "runs").rglob("test_metrics.json"))
    assert len(finished) == 8
    for run_dir in finished:
        method, protocol, dataset, shots, seed = run_dir.relative_to(sweep_dir / "runs").parts
        data = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
        assert (method, protocol) == ("linearprobe", "fewshot")
        assert (data["dataset"], f"shots_{data['num_shots']}", f"seed_{data['seed']}") == (dataset, shots, seed)
        assert list(run_dir.glob("checkpoints/*.ckpt")) and list(run_dir.glob("events.out.tfevents.*"))


def test_sweep_again_runs_nothing(sweep_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    def fail() -> None:
        raise AssertionError(f"re-ran a finished run: {sys.argv}")

    monkeypatch.setattr(cli, "main", fail)
    argv = TINY_SWEEP + ["--datasets", "oxford_pets", "dtd", "--shots", "1", "2", "--seeds", "1", "2"]
    cli.sweep_main(argv + ["--out", str(sweep_dir / "runs"), "--data.root", str(sweep_dir / "data")])
    assert "8 runs, 8 finished, 0 to run" in capsys.readouterr().out


def test_report_equals_the_per_run_metrics(sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    cli.main(["report", str(sweep_dir / "runs"), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "### linearprobe — fewshot accuracy (%)" in printed and "±" in printed
    rows = {row["row"]: row for row in csv.DictReader((tmp_path / "linearprobe_fewshot_accuracy.csv").open())}
    means = {}
    for dataset in ("oxford_pets", "dtd"):
        for shots in (1, 2):
            accs = [
                json.loads((sweep_dir / f"runs/linearprobe/fewshot/{dataset}/shots_{shots}/seed_{s}/test_metrics.json")
                .read_text())[f"test/{dataset}/acc"]
                for s in (1, 2)
            ]  # fmt: skip
            means[dataset, shots] = statistics.fmean(accs)
            column = "1 shot" if shots == 1 else "2 shots"
            assert float(rows[dataset][column]) == pytest.approx(means[dataset, shots], abs=1e-4)
            assert float(rows[dataset][f"{column} std"]) == pytest.approx(statistics.pstdev(accs), abs=1e-4)
            assert f"{means[dataset, shots]:.2f} ± {statistics.pstdev(accs):.2f}" in printed
    average = statistics.fmean([means["oxford_pets", 1], means["dtd", 1]])
    assert float(rows["Average (2)"]["1 shot"]) == pytest.approx(average, abs=1e-4)
    assert (tmp_path / "report.md").read_text() in printed


def test_sweep_jobs_are_valid_slurm_scripts_for_unfinished_runs_only(sweep_dir: Path, tmp_path: Path):
    argv = TINY_SWEEP + ["--datasets", "oxford_pets", "eurosat", "--shots", "1", "--seeds", "1", "2"]
    argv += ["--out", str(sweep_dir / "runs"), "--data.root", str(sweep_dir / "data")]
    cli.sweep_main(argv + ["--jobs", str(tmp_path / "jobs"), "--job-header", str(REPO / "scripts/slurm/header.sh")])
    jobs = sorted((tmp_path / "jobs").glob("*.sh"))
    assert [j.name for j in jobs] == [
        "linearprobe__fewshot__eurosat__shots_1__seed_1.sh",
        "linearprobe__fewshot__eurosat__shots_1__seed_2.sh",
    ]  # oxford_pets 1 shot is finished
    for job in jobs:
        subprocess.run(["bash", "-n", str(job)], check=True)
        text = job.read_text()
        assert text.startswith("#!/bin/bash") and "#SBATCH --ntasks-per-node=1" in text
        assert "\nsrun clipadapt fit --config" in text and "--data.dataset eurosat" in text
    # A finished run's job does nothing (safe to resubmit); an unfinished one starts from an empty folder.
    done = sweep_dir / "runs/linearprobe/fewshot/oxford_pets/shots_1/seed_1"
    finished_job = tmp_path / "finished.sh"
    finished_job.write_text(experiments.job_script(["fit", "--no-such-flag"], done))
    subprocess.run(["bash", str(finished_job)], check=True)
    stale = tmp_path / "stale/run"
    (stale / "checkpoints").mkdir(parents=True)
    stale_job = tmp_path / "stale.sh"
    stale_job.write_text(experiments.job_script(["data", "--help"], stale))
    subprocess.run(["bash", str(stale_job)], check=True, capture_output=True)
    assert not stale.exists()


@pytest.mark.slow  # two processes: make test-slow
def test_multi_device_sweep_runs_each_point_in_its_own_process(tmp_path: Path):
    # In one process the second DDP run would find the first one's ranks gone; each point gets its own.
    write_synthetic(tmp_path / "data", "oxford_pets")
    argv = TINY_SWEEP + ["--shots", "2", "--seeds", "1", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    cli.sweep_main(argv + ["--out", str(tmp_path / "runs"), "--data.root", str(tmp_path / "data")])
    for seed in (1, 2):
        metrics = tmp_path / f"runs/linearprobe/fewshot/oxford_pets/shots_2/seed_{seed}/test_metrics.json"
        assert json.loads(metrics.read_text())["test/oxford_pets/count"] == 24
        config = yaml.safe_load((metrics.parent / "config.yaml").read_text())
        assert (str(config["trainer"]["devices"]), config["data"]["seed"]) == ("2", seed)


# ---- cluster scripts ----


@pytest.mark.parametrize("script", ["scripts/slurm/fit.sh", "scripts/slurm/header.sh", "scripts/torchrun.sh"])
def test_cluster_scripts_parse(script: str):
    subprocess.run(["bash", "-n", str(REPO / script)], check=True)


def test_slurm_script_hands_the_allocation_to_lightning(tmp_path: Path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    env = os.environ | {
        "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}",
        "SRUN_ARGS": str(tmp_path / "args"),
        **{"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_ID": "77"},
    }
    script = REPO / "scripts/slurm/fit.sh"
    subprocess.run(["bash", str(script), "cfg.yaml", "--trainer.devices", "1"], env=env, check=True)
    args = (tmp_path / "args").read_text().splitlines()
    line = " ".join(args)
    assert args[:3] == ["clipadapt", "fit", "--config"] and "--trainer.default_root_dir runs/slurm/77" in line
    # The allocation's shape comes last, so it wins over a contradicting user flag.
    assert line.endswith("--trainer.num_nodes 2 --trainer.devices 4 --trainer.strategy ddp")


@pytest.mark.slow  # two processes: make test-slow
def test_torchrun_script_trains_with_two_processes(tmp_path: Path):
    write_synthetic(tmp_path / "data", "oxford_pets")
    env = os.environ | {"ACCELERATOR": "cpu", "PRECISION": "32-true", "NPROC": "2", "MASTER_PORT": str(free_port())}
    out = subprocess.run(
        ["bash", str(REPO / "scripts/torchrun.sh"), str(REPO / "configs/linear_probe_fewshot.yaml")]
        + ["--config", str(REPO / "configs/tiny.yaml"), "--data.root", str(tmp_path / "data")]
        + ["--data.cache_dir", str(tmp_path / "cache"), "--trainer.default_root_dir", str(tmp_path / "run")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Starting with 2 processes" in out.stdout + out.stderr
    (metrics,) = (tmp_path / "run").rglob("test_metrics.json")
    assert json.loads(metrics.read_text())["test/oxford_pets/count"] == 24  # every test image once, over 2 ranks
