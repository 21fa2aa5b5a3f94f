"""The `clipadapt` command.

    clipadapt fit  --config configs/ast_fewshot.yaml --data.root DATA --data.dataset oxford_pets
    clipadapt test --config configs/zeroshot.yaml --data.root DATA --data.dataset eurosat
    clipadapt data check --root DATA --dataset oxford_pets --num-shots 16 --seed 1
    clipadapt export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out tuned.pt
    clipadapt sweep --config configs/ast_fewshot.yaml --datasets oxford_pets dtd --shots 1 16 --seeds 1 2 3 --data.root DATA
    clipadapt report runs
    clipadapt pretrain-toy --out /tmp/toy        (or --check: retrain the shipped toy CLIP and compare)

fit / validate / test / predict are LightningCLI subcommands (the method is the config's
`model.class_path`); `data`, `export`, `sweep`, `report` and `pretrain-toy` are ours. `fit` ends with the protocol's test of the last-epoch weights
(as Dassl's train.py does) unless `--test_after_fit false`. The global seed defaults to
`data.seed`, so `--data.seed 2` changes the few-shot draw and the training randomness together.

`clipadapt --help` lists every subcommand without importing torch, Lightning or open_clip: each
subcommand imports what it needs when it runs (the LightningCLI lives in `clipadapt.lightning_cli`,
which also documents `--ckpt_path` and the checkpoints, resume and logging defaults).
"""

import argparse
import inspect
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clipadapt.errors import ClipAdaptError


def data_main(argv: Sequence[str]) -> None:
    """`clipadapt data check` / `prepare`: (download and arrange, then) validate a dataset, decode every image."""
    from clipadapt.data import prepare
    from clipadapt.data.datamodule import summarize_dataset
    from clipadapt.data.images import check_images
    from clipadapt.data.readers import read_splits

    parser = argparse.ArgumentParser(prog="clipadapt data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser(
        "check", help="validate a CoOp-layout root: classes, split counts, and every image decoded (in parallel)"
    )
    check.add_argument("--root", required=True, help="folder that holds the dataset folders (CoOp's $DATA)")
    check.add_argument("--dataset", required=True, help="dataset name, e.g. oxford_pets or OxfordPets")
    check.add_argument("--num-shots", type=int, default=0, help="also draw K shots per class (0: skip)")
    check.add_argument("--seed", type=int, default=1, help="seed of the few-shot draw")
    check.add_argument("--workers", type=int, help="threads that decode images (default: CPUs + 4, at most 32)")
    check.add_argument("--no-decode", action="store_true", help="check the layout and the split files only")
    prepare.add_arguments(sub.add_parser("prepare", help="download, verify and arrange a CoOp dataset, then check it"))
    args = parser.parse_args(argv)
    if args.command == "prepare":  # then checked like `data check`
        try:
            prepare.prepare(args.dataset, args.root, args.mirror, args.downloads, args.keep_downloads, say=print)
        except (ValueError, ClipAdaptError) as err:
            sys.exit(f"clipadapt data prepare: {err}")
        args.num_shots, args.seed, args.workers = 0, 1, None
    if args.workers is not None and args.workers < 1:
        sys.exit(f"clipadapt data check: --workers must be 1 or more, got {args.workers}")
    try:
        splits = read_splits(args.root, args.dataset)
        report = summarize_dataset(args.root, args.dataset, num_shots=args.num_shots, seed=args.seed, splits=splits)
    except (FileNotFoundError, ValueError, ClipAdaptError) as err:
        sys.exit(f"clipadapt data check: {err}")
    print(report, flush=True)
    if args.no_decode:
        return
    lines, bad = check_images(splits, workers=args.workers, progress=True)
    print("\n".join(lines))
    if bad:
        sys.exit(
            f"clipadapt data check: {bad} image(s) cannot be decoded (listed above); "
            "replace them or remove them from the split"
        )


EXTRAS_USAGE = {  # how to use what an export writes beside the open_clip weights, by key prefix
    # any other key (prompts, adapters, caches): the method's export_state_dict docstring says how to use it
    "head": "the learned (C, D) class head, one row per extras['classnames']: "
    "logits = logit_scale.exp() * normalize(image_features) @ normalize(extras['head']).T",
    "adapter.": "RAda's rational adapter (clipadapt.models.rational.RationalAdapter state, keys adapter.*): "
    "evaluate it with `clipadapt test --ckpt_path CKPT`",
}


def export_main(argv: Sequence[str]) -> None:
    """`clipadapt export`: a checkpoint's tuned weights as a plain open_clip state dict (+ the method's extras)."""
    parser = argparse.ArgumentParser(
        prog="clipadapt export",
        description="Write a fit checkpoint's model as a plain open_clip state dict: "
        "open_clip.create_model(ARCH, pretrained=OUT) loads it. What open_clip has no place for (Adapt's prompts, "
        "a learned class head, RAda's adapter) goes beside it into OUT_STEM.extras.pt.",
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `clipadapt fit`")
    parser.add_argument("--out", required=True, help="the state dict file to write (.pt)")
    args = parser.parse_args(argv)
    try:
        _export(args.ckpt, Path(args.out))
    except (FileNotFoundError, ValueError, ClipAdaptError) as err:
        sys.exit(f"clipadapt: error: {err}")


def _export(ckpt: str, out: Path) -> None:
    import open_clip
    import torch

    import clipadapt.methods
    from clipadapt import checkpoints
    from clipadapt.methods import AdaptationModule

    checkpoint = checkpoints.read_checkpoint(ckpt, "--ckpt")
    methods = {f"{c.__module__}.{c.__qualname__}": c for c in vars(clipadapt.methods).values() if isinstance(c, type)}
    method = methods.get(checkpoints.method_path(checkpoint))
    if method is None or not issubclass(method, AdaptationModule):  # never import a module a file names
        raise ClipAdaptError(
            f"--ckpt {ckpt} is a checkpoint of {checkpoints.method_path(checkpoint)}, which is not a method of "
            "clipadapt.methods: export it from Python with its own class"
        )
    # No weights are downloaded (pretrained=None) and no optimizer is needed: the state dict has everything.
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_") and k != "optimizer"}
    tag = hparams.get("pretrained")
    module = method(**(hparams | {"pretrained": None}))
    module.on_load_checkpoint(checkpoint)  # method state (e.g. a selection) before the weights
    module.load_state_dict(checkpoint["state_dict"])
    state = module.export_state_dict()
    names = module.clip.model.state_dict().keys()
    torch.save({name: state[name] for name in names}, out)

    arch = module.clip.arch  # a model_config's file stem, when there is one
    quick_gelu = isinstance(tag, str) and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    extra = ", force_quick_gelu=True" if quick_gelu and not open_clip.get_model_config(arch).get("quick_gelu") else ""
    print(f"wrote {out} ({type(module).__name__}, arch {arch}): a plain open_clip state dict")
    if arch.startswith(("hf-hub:", "local-dir:")):  # open_clip ignores `pretrained` for these names
        print(
            f"load it with: open_clip.create_model({arch!r}, load_weights=False).load_state_dict(torch.load({str(out)!r}))"
        )
    else:
        print(f"load it with: open_clip.create_model({arch!r}, pretrained={str(out)!r}{extra})")
    if hparams.get("model_config"):
        print(f"(your own config: `open_clip.add_model_config({str(hparams['model_config'])!r})` first)")
    elif arch.startswith("clipadapt-"):
        print("(a clipadapt test arch: `import clipadapt.models` first, it registers the config with open_clip)")
    extras = {name: tensor for name, tensor in state.items() if name not in names}
    if extras:
        beside = out.with_name(f"{out.stem}.extras.pt")
        torch.save(extras | {"classnames": list(hparams["classnames"])}, beside)
        print(f"wrote {beside}: what open_clip has no place for (the weights alone lack it)")
        print(f"load it with: extras = torch.load({str(beside)!r}, weights_only=True)")
        if any(not name.startswith(tuple(EXTRAS_USAGE)) for name in extras):  # the method says how to use its own
            print(inspect.cleandoc(type(module).export_state_dict.__doc__ or ""))
        for prefix, usage in EXTRAS_USAGE.items():
            if any(name.startswith(prefix) for name in extras):
                print(f"  {usage}")


def sweep_main(argv: Sequence[str]) -> None:
    """`clipadapt sweep`: one config over datasets x shots x seeds (x grid); resumable, local or one job per run."""
    parser = argparse.ArgumentParser(
        prog="clipadapt sweep",
        allow_abbrev=False,
        description="Run `clipadapt fit` for every dataset x shots x seed (x --grid value) into "
        "OUT/<method>/<protocol>/<dataset>/shots_<K>/seed_<S>/, skipping finished runs (test_metrics.json exists) "
        "and resuming interrupted ones from their checkpoints/last.ckpt. "
        "Any other argument (e.g. --data.root DATA, --trainer.max_epochs 5) is passed to every run.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s), as for `clipadapt fit`")
    parser.add_argument("--datasets", nargs="+", help="dataset names (default: the config's data.dataset)")
    parser.add_argument("--shots", nargs="+", type=int, help="shot counts (default: the config's data.num_shots)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="seeds (default: 1 2 3)")
    parser.add_argument("--grid", action="append", default=[], help="KEY=V1,V2,... e.g. model.init_args.top_k=2,4")
    parser.add_argument("--out", default="runs", help="root of the run folders (default: runs)")
    parser.add_argument("--method", help="method folder name (default: the model class, lower case)")
    parser.add_argument("--protocol", help="protocol folder name (default: fewshot | base2novel | ood from data.*)")
    parser.add_argument("--jobs", help="write one job script per unfinished run into this folder instead of running")
    parser.add_argument("--job-header", help="file whose text heads each job script (e.g. scripts/slurm/header.sh)")
    parser.add_argument(
        "--command", choices=["fit", "test"], default="fit", help="`test` for methods that do not train (zero-shot)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs and their state, run nothing")
    parser.add_argument(
        "--isolate",
        action="store_true",
        help="run each point in its own Python process (automatic unless trainer.devices is 1 on one node)",
    )
    args, extra = parser.parse_known_args(argv)
    from clipadapt import experiments
    from clipadapt.data.readers import resolve_dataset

    try:  # a missing config or a misspelt dataset fails here, not after hours of other runs
        config = experiments.merged_config(args.config, extra)
        data = config.get("data", {})
        runs = experiments.expand(
            args.method or experiments.method_name(config),
            args.protocol or experiments.protocol_name(data),
            [resolve_dataset(d).name for d in args.datasets or [data.get("dataset", "oxford_pets")]],
            args.shots or [int(data.get("num_shots", 16))],
            args.seeds,
            experiments.parse_grid(args.grid),
        )
        header = Path(args.job_header).read_text() if args.job_header else ""
    except (OSError, ValueError) as err:
        sys.exit(f"clipadapt sweep: {err}")
    todo = [run for run in runs if not experiments.is_finished(Path(args.out) / run.relpath())]
    print(f"clipadapt sweep: {len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run")
    isolate = args.isolate or experiments.needs_own_process(config)
    failed = []
    for i, run in enumerate(todo, 1):
        run_dir = Path(args.out) / run.relpath()
        fit = experiments.fit_args(run, run_dir, args.config, extra, args.command)
        resume = experiments.resume_checkpoint(run_dir) if args.command == "fit" else None
        if args.dry_run:
            print(f"  {'resume' if resume else 'todo'} {run_dir}")
        elif args.jobs:
            job = Path(args.jobs) / ("__".join(run.relpath().parts) + ".sh")
            job.parent.mkdir(parents=True, exist_ok=True)
            job.write_text(experiments.job_script(fit, run_dir, header))
            print(f"  wrote {job}")
        else:
            print(f"[{i}/{len(todo)}] {run_dir}" + (f" (resumed from {resume})" if resume else ""), flush=True)
            if resume:  # interrupted: continue from its last epoch, in the same folder
                fit += ["--ckpt_path", str(resume)]
            elif run_dir.exists():  # interrupted before its first checkpoint: start it over, stale events included
                shutil.rmtree(run_dir)
            if isolate:
                if subprocess.run([sys.executable, "-m", "clipadapt.cli", *fit]).returncode:
                    failed.append(run_dir)
                continue
            # As if launched as `clipadapt fit ...`: Lightning's DDP launcher starts the other ranks from sys.argv.
            argv0, sys.argv = sys.argv, [sys.argv[0], *fit]
            try:
                main()
            except Exception as err:  # one broken point must not stop a 165-run sweep; reported below
                failed.append(run_dir)
                print(f"  FAILED {run_dir}: {type(err).__name__}: {err}", file=sys.stderr)
            finally:
                sys.argv = argv0
    if args.jobs and todo:
        print(f'submit with: for f in {args.jobs}/*.sh; do sbatch "$f"; done')
    if failed:
        sys.exit(f"clipadapt sweep: {len(failed)} run(s) failed: " + ", ".join(map(str, failed)))


def report_main(argv: Sequence[str]) -> None:
    """`clipadapt report`: the papers' tables (mean ± std over seeds) from finished run folders."""
    parser = argparse.ArgumentParser(
        prog="clipadapt report",
        description="Read every run folder under RUNS (config.yaml + test_metrics.json; nothing is re-run) and "
        "print the few-shot, base-to-novel and ImageNet OOD tables; also write report.md and one CSV per table.",
    )
    parser.add_argument("runs", nargs="?", default="runs", help="root of the run folders (default: runs)")
    parser.add_argument("--out", help="folder for report.md and the CSVs (default: RUNS)")
    parser.add_argument(
        "--select-by",
        choices=["val"],
        help="also pick, per dataset and shots, the --grid value with the best seed-mean val accuracy "
        "(e.g. Adapt's T_target over adapt-target_length_* folders) and tabulate its test accuracy",
    )
    parser.add_argument(
        "--compare",
        nargs="*",
        metavar="METHOD",
        help="one table per protocol with the methods as rows and the datasets as columns (the papers' layout); "
        "names pick and order the rows (default: every method)",
    )
    args = parser.parse_args(argv)
    from clipadapt import experiments

    skipped: list[str] = []
    results = experiments.read_results(Path(args.runs), skipped)
    for problem in skipped:
        print(f"clipadapt report: skipped {problem}", file=sys.stderr)
    if not results:
        sys.exit(f"clipadapt report: no finished run (test_metrics.json) under {args.runs}")
    selected = experiments.selection_tables(results) if args.select_by else []
    if args.select_by and not selected:
        sys.exit(
            f"clipadapt report: --select-by val found no grid runs under {args.runs} (method folders such as "
            "adapt-target_length_64, written by `clipadapt sweep --grid`); sweep a grid or drop --select-by"
        )
    out = Path(args.out or args.runs)
    out.mkdir(parents=True, exist_ok=True)
    markdown = []
    if args.compare is None:
        tables = experiments.tables(results)
    else:
        tables = experiments.comparison_tables(results, args.compare or None)
    for table in tables + selected:
        markdown.append(experiments.to_markdown(table))
        (out / f"{experiments.table_slug(table)}.csv").write_text(experiments.to_csv(table))
    text = "\n".join(markdown)
    (out / "report.md").write_text(text)
    print(text)
    print(f"{len(results)} runs; wrote {out / 'report.md'} and {len(markdown)} CSV file(s)")
    if skipped:
        sys.exit(
            f"clipadapt: error: {len(skipped)} run(s) left out of the tables (unreadable files, listed above): "
            "run them again (delete their test_metrics.json; `clipadapt sweep` then re-runs them)"
        )


def pretrain_toy_main(argv: Sequence[str]) -> None:
    """`clipadapt pretrain-toy`: pretrain the toy CLIP on the toy world (or `--check` the shipped weights)."""
    from clipadapt.toy.pretrain import main as pretrain_main

    pretrain_main(argv)


COMMANDS = {
    "data": data_main,
    "export": export_main,
    "sweep": sweep_main,
    "report": report_main,
    "pretrain-toy": pretrain_toy_main,
}
LIGHTNING_COMMANDS = {
    "fit": "train a method (the config's model.class_path), then test the last-epoch model",
    "validate": "evaluate on the validation split",
    "test": "evaluate on the test sets (zero-shot, training-free methods, or --ckpt_path of a fit)",
    "predict": "predicted classes of the first evaluation set",
}


def usage() -> str:
    """What `clipadapt --help` prints: every subcommand, one line each."""
    lines = [
        "usage: clipadapt {" + ",".join([*LIGHTNING_COMMANDS, *COMMANDS]) + "} ...",
        "",
        "Few-shot adaptation of CLIP-style models (CoOp protocol) on PyTorch Lightning and open_clip.",
        "",
        "subcommands (`clipadapt SUBCOMMAND --help` for the options of one):",
    ]
    for name, text in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:9} {text}")
    for name, command in COMMANDS.items():
        summary = (command.__doc__ or "").strip().splitlines()[0] if command.__doc__ else ""
        lines.append(f"  {name:9} {summary.split(': ', 1)[-1].rstrip('.')}")
    lines += ["", "example: clipadapt fit --config configs/demo.yaml"]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if args is None else list(args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        if not argv:
            sys.exit(2)
        return
    if argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    from clipadapt.lightning_cli import run  # torch, Lightning and open_clip: only now

    run(args)


def __getattr__(name: str) -> Any:
    """`clipadapt.cli.ClipAdaptCLI` and its helpers, from the module that imports Lightning (on first use)."""
    if name.startswith("__"):
        raise AttributeError(name)
    from clipadapt import lightning_cli

    try:
        return getattr(lightning_cli, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


if __name__ == "__main__":
    main()
