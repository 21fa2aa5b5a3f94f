"""Paper-scale experiments: sweep expansion, run naming, finished-run detection and the result tables.

A sweep expands one config over datasets x shots x seeds (x any `--grid` key) into runs whose folder says
what they are, `<out>/<method>/<protocol>/<dataset>/shots_<K>/seed_<S>/`; a run is finished once
`test_metrics.json` exists there; an unfinished fit with a `checkpoints/last.ckpt` is resumed from it
(`--ckpt_path`, into the same folder), one without starts over. The report reads those folders (saved `config.yaml` + final metrics)
and builds the papers' tables: few-shot accuracy, base/novel/HM, ImageNet -> OOD, and several methods
side by side (`comparison_tables`: rows = methods, columns = datasets + average; also cross-dataset).
Everything but the file reading is a pure function of plain data.

Selection on validation (`clipadapt report --select-by val`, e.g. Adapt's "adaptive T_target"): among the
values of a grid (method folders `adapt-target_length_64`, `adapt-target_length_128`, ...), each
(dataset, shots) cell takes the value with the best val accuracy (`val/acc` of each run's last
validation; test accuracy is never looked at) and reports that value's test accuracy, mean ± std over
seeds. Decision: one value per (dataset, shots), chosen on the seed-mean val accuracy, as the paper
picks one T_target per dataset, so the std is the seed spread of one configuration. Ties go to the first
value in natural order (64 before 128). A cell where any grid value lacks a seed or a val accuracy is
left empty: no choice is made from part of a grid.
"""

import csv
import dataclasses
import io
import itertools
import json
import logging
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from clipadapt.data.readers import resolve_dataset
from clipadapt.methods.base import harmonic_mean

# The 11 datasets of the few-shot and base-to-novel averages (CoOp / CoCoOp order).
PAPER_DATASETS = (
    "imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
    "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101",
)  # fmt: skip
OOD_SETS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
SUBSETS = ("all", "base", "novel", "new")  # eval_sets entries that name part of the training dataset
METRICS_FILE = "test_metrics.json"
VAL_KEY = "val/acc"  # the last validation accuracy of a run, in test_metrics.json (AdaptationModule.run_summary)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Run:
    """One point of a sweep: what to train and where its folder is."""

    method: str
    protocol: str
    dataset: str
    shots: int
    seed: int
    overrides: tuple[tuple[str, str], ...] = ()  # (dotted key, value) of the grid point

    def relpath(self) -> Path:
        """`method[-key_value...]/protocol/dataset/shots_K/seed_S`."""
        variant = "".join(f"-{key.rsplit('.', 1)[-1]}_{_safe(value)}" for key, value in self.overrides)
        return Path(f"{self.method}{variant}", self.protocol, self.dataset, f"shots_{self.shots}", f"seed_{self.seed}")


def _safe(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=]+", "_", str(value)).strip("_")


def merged_config(configs: list[str], overrides: list[str]) -> dict[str, Any]:
    """The YAML files deep-merged in order, then `--a.b value` pairs applied (enough to name a run)."""
    merged: dict[str, Any] = {}
    for path in configs:
        _merge(merged, yaml.safe_load(Path(path).read_text()) or {})
    for flag, value in zip(overrides, overrides[1:], strict=False):
        if flag.startswith("--") and "." in flag and not value.startswith("--"):
            *parents, leaf = flag[2:].split(".")
            node = merged
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = yaml.safe_load(value)
    return merged


def _merge(into: dict, new: dict) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def method_name(config: dict[str, Any]) -> str:
    """The method's class name, lower case: `clipadapt.methods.clip_ast.CLIPAST` -> `clipast`."""
    return str(config.get("model", {}).get("class_path", "model")).rsplit(".", 1)[-1].lower()


def protocol_name(data: dict[str, Any]) -> str:
    """`ood` (ImageNet -> V2/Sketch/A/R), `crossdataset` (tests other datasets), `base2novel` or `fewshot`."""
    sets = [str(s) for s in data.get("eval_sets") or []]
    if any(s in OOD_SETS for s in sets):
        return "ood"
    if {"base", "novel"} <= set(sets):  # other test sets beside them are extra columns (e.g. the pretraining domain)
        return "base2novel"
    own = dataset_name(str(data.get("dataset", "")))
    if any(s not in SUBSETS and dataset_name(s) != own for s in sets):
        return "crossdataset"
    if data.get("subsample") == "base" or {"base", "novel"} <= set(sets):
        return "base2novel"
    return "fewshot"


def expand(
    method: str, protocol: str, datasets: list[str], shots: list[int], seeds: list[int], grid: dict[str, list[str]]
) -> list[Run]:
    """Every (grid point, dataset, shots, seed), seeds innermost so early results already cover all seeds."""
    keys = list(grid)
    points = [tuple(zip(keys, values, strict=True)) for values in itertools.product(*grid.values())]
    return [
        Run(method, protocol, d, k, s, point) for point, d, k, s in itertools.product(points, datasets, shots, seeds)
    ]


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """`["model.init_args.top_k=2,4"]` -> `{"model.init_args.top_k": ["2", "4"]}`."""
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid wants KEY=V1,V2,..., got {item!r}")
        grid[key.removeprefix("--")] = values.split(",")
    return grid


def dataset_name(name: str) -> str:
    """The snake-case name the metrics use (`OxfordPets` -> `oxford_pets`); unknown names stay as they are."""
    try:
        return resolve_dataset(name).name
    except ValueError:
        return name


def is_finished(run_dir: Path) -> bool:
    """A run is finished once its test metrics are written (the last thing `clipadapt fit` does)."""
    return (Path(run_dir) / METRICS_FILE).is_file()


def resume_checkpoint(run_dir: Path) -> Path | None:
    """The `last.ckpt` an interrupted `clipadapt fit` left in `run_dir` (checkpoints are written whole), else None."""
    ckpt = Path(run_dir) / "checkpoints" / "last.ckpt"
    return ckpt if ckpt.is_file() else None


def needs_own_process(config: dict[str, Any]) -> bool:
    """True unless the run is one process on one device: DDP ranks cannot be relaunched twice in one process."""
    trainer = config.get("trainer", {})
    return str(trainer.get("devices", "auto")) != "1" or str(trainer.get("num_nodes", 1)) != "1"


def fit_args(run: Run, run_dir: Path, configs: list[str], extra: list[str], command: str = "fit") -> list[str]:
    """`clipadapt fit` (or `test`) arguments of one run; the logger writes straight into `run_dir` (no version_N)."""
    args = [command, *itertools.chain.from_iterable(("--config", c) for c in configs), *extra]
    args += ["--data.dataset", run.dataset, "--data.num_shots", str(run.shots), "--data.seed", str(run.seed)]
    for key, value in run.overrides:
        args += [f"--{key}", value]
    return args + [
        *("--trainer.default_root_dir", str(run_dir)),
        *("--trainer.logger.class_path", "lightning.pytorch.loggers.TensorBoardLogger"),
        *("--trainer.logger.init_args.save_dir", str(run_dir)),
        *("--trainer.logger.init_args.name", "", "--trainer.logger.init_args.version", ""),
    ]


def job_script(args: list[str], run_dir: Path, header: str = "") -> str:
    """A bash job (SLURM header optional) for one sweep point; `srun` lets Lightning see the allocation.

    Resubmitting is safe: a finished run exits at once, an interrupted fit resumes from its last.ckpt, and a
    run without one starts over in a clean folder.
    """
    launch = "srun " if "#SBATCH" in header else ""
    folder = shlex.quote(str(run_dir))
    lines = [header.rstrip("\n") if header else "#!/bin/bash", "set -euo pipefail"]
    lines += [f"[ -f {folder}/{METRICS_FILE} ] && exit 0"]
    command = launch + shlex.join(["clipadapt", *args])
    if args[:1] != ["fit"]:
        return "\n".join([*lines, f"rm -rf {folder}", command]) + "\n"
    ckpt = shlex.quote(str(Path(run_dir) / "checkpoints" / "last.ckpt"))
    lines += [
        "resume=()",
        f"if [ -f {ckpt} ]; then resume=(--ckpt_path {ckpt}); else rm -rf {folder}; fi",
    ]
    return "\n".join([*lines, command + ' ${resume[@]+"${resume[@]}"}']) + "\n"


# ---- report ----


@dataclass
class Result:
    """A finished run as the report sees it."""

    method: str
    protocol: str
    dataset: str
    shots: int
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    path: str = ""


def read_results(root: Path, skipped: list[str] | None = None) -> list[Result]:
    """Every finished run under `root` (sweep folders or plain `lightning_logs/version_N`).

    A run whose files cannot be read (a truncated `test_metrics.json`, a broken `config.yaml`) is left
    out, never guessed: `<file>: <reason>` is appended to `skipped`, or logged when it is None.
    """
    results = []
    for metrics_file in sorted(Path(root).rglob(METRICS_FILE)):
        try:
            results.append(_read_result(Path(root), metrics_file))
        # json.JSONDecodeError is a ValueError; a config.yaml of the wrong shape fails with the other two
        except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as err:
            problem = f"{metrics_file}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            if skipped is None:
                log.warning("left out of the report: %s", problem)
            else:
                skipped.append(problem)
    return results


def _read_result(root: Path, metrics_file: Path) -> Result:
    run_dir = metrics_file.parent
    config_file = run_dir / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise ValueError(f"{config_file} is not a mapping")
    data = config.get("data", {})
    parts = run_dir.relative_to(root).parts
    if len(parts) >= 5 and parts[-2].startswith("shots_") and parts[-1].startswith("seed_"):
        method, protocol = parts[-5], parts[-4]  # the sweep's names (carry the grid variant)
    else:
        method, protocol = method_name(config), protocol_name(data)
    dataset, shots, seed = dataset_name(str(data.get("dataset", "?"))), data.get("num_shots", 0), data.get("seed", 0)
    metrics = json.loads(metrics_file.read_text())
    numbers = isinstance(metrics, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()
    )
    if not numbers:
        raise ValueError("not a JSON object of numbers")
    return Result(method, protocol, dataset, int(shots), int(seed), metrics, str(run_dir))


def mean_std(values: list[float]) -> tuple[float, float] | None:
    """Mean and population std over seeds (as Dassl's parse_test_res.py); None when there is no run."""
    return (statistics.fmean(values), statistics.pstdev(values)) if values else None


def _shots(k: int) -> str:
    return f"{k} shot" + ("s" if k != 1 else "")


def _ordered(names: set[str]) -> list[str]:
    return [d for d in PAPER_DATASETS if d in names] + sorted(names - set(PAPER_DATASETS))


def _acc(results: list[Result], key: str) -> tuple[float, float] | None:
    return mean_std([r.metrics[key] for r in results if key in r.metrics])


Cell = tuple[float, float] | float | str | None  # mean ± std, a derived value, a grid value chosen, or a gap
# {"title", "kind": fewshot | base2novel | ood | choice | compare, "columns", "rows": [(label, [Cell])]}
Table = dict[str, Any]


def _average(rows: list[list[Cell]], column: int) -> float | None:
    """Mean over datasets of the seed means; a gap if any dataset lacks the column (no partial averages)."""
    cells = [row[column] for row in rows]
    if not cells or any(c is None for c in cells):
        return None
    return statistics.fmean(c[0] if isinstance(c, tuple) else c for c in cells)


def fewshot_table(title: str, results: list[Result]) -> Table:
    """Rows: datasets + Average; columns: shot counts; cells: mean ± std over seeds of `test/<dataset>/acc`."""
    shots = sorted({r.shots for r in results})
    datasets = _ordered({r.dataset for r in results})
    rows = [
        [_acc([r for r in results if r.dataset == d and r.shots == k], f"test/{d}/acc") for k in shots]
        for d in datasets
    ]
    average = [_average(rows, i) for i in range(len(shots))]
    labels = [*datasets, f"Average ({len(datasets)})"]
    return {
        "title": title,
        "kind": "fewshot",
        "columns": [_shots(k) for k in shots],
        "rows": list(zip(labels, [*rows, average], strict=True)),
    }


def base2novel_table(title: str, results: list[Result]) -> Table:
    """Rows: datasets + Average; Base, Novel (mean ± std over seeds) and HM of the seed-averaged B and N."""
    datasets = _ordered({r.dataset for r in results})
    rows = []
    for d in datasets:
        runs = [r for r in results if r.dataset == d]
        base, novel = _acc(runs, "test/base/acc"), _acc(runs, "test/novel/acc")
        rows.append([base, novel, harmonic_mean(base[0], novel[0]) if base and novel else None])
    base, novel = _average(rows, 0), _average(rows, 1)
    hm = harmonic_mean(base, novel) if base is not None and novel is not None else None
    labels = [*datasets, f"Average ({len(datasets)})"]
    return {
        "title": title,
        "kind": "base2novel",
        "columns": ["Base", "Novel", "HM"],
        "rows": list(zip(labels, [*rows, [base, novel, hm]], strict=True)),
    }


def ood_table(title: str, results: list[Result]) -> Table:
    """Rows: shot counts; columns: ImageNet, V2, Sketch, A, R and the mean of the four OOD sets."""
    rows = []
    for k in sorted({r.shots for r in results}):
        runs = [r for r in results if r.shots == k]
        cells = [_acc(runs, f"test/{s}/acc") for s in ("imagenet", *OOD_SETS)]
        rows.append((_shots(k), [*cells, _average([[c] for c in cells[1:]], 0)]))
    return {
        "title": title,
        "kind": "ood",
        "columns": ["ImageNet", "-V2", "-Sketch", "-A", "-R", "OOD avg"],
        "rows": rows,
    }


def tables(results: list[Result]) -> list[Table]:
    """One table per (method, protocol), base-to-novel also per shot count, in a stable order."""
    out = []
    for method, protocol in sorted({(r.method, r.protocol) for r in results}):
        group = [r for r in results if r.method == method and r.protocol == protocol]
        if protocol == "ood":
            out.append(ood_table(f"{method} — ImageNet → OOD", group))
        elif protocol == "base2novel":
            for k in sorted({r.shots for r in group}):
                subset = [r for r in group if r.shots == k]
                out.append(base2novel_table(f"{method} — base-to-novel, {k} shots", subset))
        elif protocol == "crossdataset":
            out += comparison_tables(group)
        else:
            out.append(fewshot_table(f"{method} — {protocol} accuracy (%)", group))
    return out


def _test_sets(results: list[Result]) -> set[str]:
    """The evaluation sets the runs report (`test/<set>/acc`)."""
    return {key.split("/")[1] for r in results for key in r.metrics if key.startswith("test/") and key.endswith("/acc")}


def comparison_tables(results: list[Result], methods: list[str] | None = None) -> list[Table]:
    """Methods side by side, as the papers print them: rows = methods, columns = datasets + average.

    One table per (protocol, shots); base-to-novel gives three (Base, Novel, HM, the HM of a method's
    seed-averaged B and N, its average from the averaged B and N), and one more per other test set of its
    runs (e.g. `toy`, the toy world's pretraining domain: what a method forgot). Cross-dataset and OOD columns are the
    source dataset, then the targets; their average is over the targets only. `methods` picks and orders
    the rows (default: all, sorted). A missing run is a gap, and so is an average over a gap.
    """
    rows_order = methods or sorted({r.method for r in results})
    out = []
    for protocol, k in sorted({(r.protocol, r.shots) for r in results}):
        group = [r for r in results if (r.protocol, r.shots) == (protocol, k) and r.method in rows_order]
        names = [m for m in rows_order if any(r.method == m for r in group)]
        if not names:
            continue

        def runs(method: str, dataset: str | None = None, group: list[Result] = group) -> list[Result]:
            return [r for r in group if r.method == method and dataset in (None, r.dataset)]

        if protocol == "base2novel":
            datasets = _ordered({r.dataset for r in group})
            cells = {
                m: [[_acc(runs(m, d), "test/base/acc"), _acc(runs(m, d), "test/novel/acc")] for d in datasets]
                for m in names
            }
            for i, column in enumerate(("Base", "Novel", "HM")):
                rows = []
                for m in names:
                    pairs = cells[m]
                    if column == "HM":
                        row = [harmonic_mean(b[0], n[0]) if b and n else None for b, n in pairs]
                        base, novel = _average(pairs, 0), _average(pairs, 1)
                        average = harmonic_mean(base, novel) if base is not None and novel is not None else None
                    else:
                        row = [pair[i] for pair in pairs]
                        average = _average(pairs, i)
                    rows.append((m, [*row, average]))
                out.append(_compare(f"base-to-novel {column} (%), {_shots(k)}", datasets, rows))
            for extra in _ordered(_test_sets(group) - set(SUBSETS)):  # e.g. the toy world's pretraining domain
                rows = []
                for m in names:
                    row = [_acc(runs(m, d), f"test/{extra}/acc") for d in datasets]
                    rows.append((m, [*row, _average([[c] for c in row], 0)]))
                out.append(_compare(f"base-to-novel training, {extra} accuracy (%), {_shots(k)}", datasets, rows))
            continue
        if protocol in ("ood", "crossdataset"):
            sources = _ordered({r.dataset for r in group})
            sets = _test_sets(group) - set(sources)
            targets = [s for s in OOD_SETS if s in sets] if protocol == "ood" else _ordered(sets - set(OOD_SETS))
            columns = [*sources, *targets]
            rows = []
            for m in names:
                row = [_acc(runs(m), f"test/{c}/acc") for c in columns]
                rows.append((m, [*row, _average([[c] for c in row[len(sources) :]], 0)]))
            title = "ImageNet → OOD" if protocol == "ood" else "cross-dataset transfer"
            out.append(_compare(f"{title} (%), {_shots(k)}", columns, rows, average=f"Average ({len(targets)})"))
            continue
        datasets = _ordered({r.dataset for r in group})
        rows = []
        for m in names:
            row = [_acc(runs(m, d), f"test/{d}/acc") for d in datasets]
            rows.append((m, [*row, _average([[c] for c in row], 0)]))
        out.append(_compare(f"{protocol} accuracy (%), {_shots(k)}", datasets, rows))
    return out


def _compare(title: str, columns: list[str], rows: list[tuple[str, list[Cell]]], average: str = "") -> Table:
    return {
        "title": f"methods compared — {title}",
        "kind": "compare",
        "columns": [*columns, average or f"Average ({len(columns)})"],
        "rows": rows,
    }


# ---- selection on validation ----


def split_variant(method: str) -> tuple[str, str]:
    """`adapt-target_length_64` -> (`adapt`, `target_length_64`): a sweep's method folder and its grid value."""
    base, _, variant = method.partition("-")
    return base, variant


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def choose_by_val(results: list[Result]) -> dict[tuple[str, str, str, int], str | None]:
    """(method, protocol, dataset, shots) -> the grid value with the best seed-mean val accuracy, or None.

    Only runs with a grid value compete. None where a grid value of the method lacks a run or a val
    accuracy for a seed that another value has in the cell. Ties go to the first value in natural order.
    """
    grids: dict[tuple[str, str], set[str]] = {}
    cells: dict[tuple[str, str, str, int], dict[str, dict[int, float | None]]] = {}
    for r in results:
        base, variant = split_variant(r.method)
        if variant:
            grids.setdefault((base, r.protocol), set()).add(variant)
            cell = cells.setdefault((base, r.protocol, r.dataset, r.shots), {})
            cell.setdefault(variant, {})[r.seed] = r.metrics.get(VAL_KEY)
    choices = {}
    for key, cell in cells.items():
        variants = sorted(grids[key[:2]], key=_natural)
        seeds = set().union(*cell.values())
        complete = all(set(cell.get(v, {})) == seeds and None not in cell[v].values() for v in variants)
        choices[key] = max(variants, key=lambda v: statistics.fmean(cell[v].values())) if complete else None
    return choices


def selection_tables(results: list[Result]) -> list[Table]:
    """Per gridded (method, protocol): the value chosen by val per dataset and shots, then the tables of its tests.

    The chosen runs are relabelled `<method> (best val)`; an undecided cell stays a gap (and so does any
    average over it).
    """
    choices = choose_by_val(results)
    chosen = []
    for r in results:
        base, variant = split_variant(r.method)
        if variant and choices.get((base, r.protocol, r.dataset, r.shots)) == variant:
            chosen.append(dataclasses.replace(r, method=f"{base} (best val)"))
    for (base, protocol, dataset, shots), variant in choices.items():
        if variant is None:  # an empty run keeps the cell, as a gap
            chosen.append(Result(f"{base} (best val)", protocol, dataset, shots, 0))
    out = []
    for base, protocol in sorted({key[:2] for key in choices}):
        cells = {key[2:]: v for key, v in choices.items() if key[:2] == (base, protocol)}
        shots = sorted({k for _, k in cells})
        datasets = _ordered({d for d, _ in cells})
        out.append(
            {
                "title": f"{base} — {protocol}: grid value chosen by val accuracy",
                "kind": "choice",
                "columns": [_shots(k) for k in shots],
                "rows": [(d, [cells.get((d, k)) for k in shots]) for d in datasets],
            }
        )
    return out + tables(chosen)


def format_cell(cell: Cell) -> str:
    """`71.23 ± 0.45`, `71.23`, a chosen grid value, or empty (a gap, never a zero)."""
    if cell is None:
        return ""
    if isinstance(cell, str):
        return cell
    return f"{cell[0]:.2f} ± {cell[1]:.2f}" if isinstance(cell, tuple) else f"{cell:.2f}"


def to_markdown(table: Table) -> str:
    """A GitHub-flavoured Markdown table with its title."""
    lines = [f"### {table['title']}", "", "| | " + " | ".join(table["columns"]) + " |"]
    lines.append("|---" * (len(table["columns"]) + 1) + "|")
    lines += [f"| {label} | " + " | ".join(format_cell(c) for c in cells) + " |" for label, cells in table["rows"]]
    return "\n".join(lines) + "\n"


def to_csv(table: Table) -> str:
    """CSV with a mean and a std column per table column (std empty for derived cells); gaps are empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["row", *itertools.chain.from_iterable((c, f"{c} std") for c in table["columns"])])
    for label, cells in table["rows"]:
        flat = []
        for c in cells:
            mean, std = c if isinstance(c, tuple) else (c, None)
            value = mean if isinstance(mean, str) or mean is None else f"{mean:.4f}"
            flat += ["" if value is None else value, "" if std is None else f"{std:.4f}"]
        writer.writerow([label, *flat])
    return buffer.getvalue()


def table_slug(table: Table) -> str:
    """A file name for the table's CSV."""
    return _safe(re.sub(r"[\s—→(),%-]+", "_", table["title"].lower())).strip("_")
