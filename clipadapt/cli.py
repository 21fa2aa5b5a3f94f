"""The `clipadapt` command.

    clipadapt fit  --config configs/ast_fewshot.yaml --data.root DATA --data.dataset oxford_pets
    clipadapt test --config configs/zeroshot.yaml --data.root DATA --data.dataset eurosat
    clipadapt data check --root DATA --dataset oxford_pets --num-shots 16 --seed 1
    clipadapt export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out tuned.pt
    clipadapt sweep --config configs/ast_fewshot.yaml --datasets oxford_pets dtd --shots 1 16 --seeds 1 2 3 --data.root DATA
    clipadapt report runs

fit / validate / test / predict are LightningCLI subcommands (the method is the config's
`model.class_path`); `data`, `export`, `sweep` and `report` are ours. `fit` ends with the protocol's test of the last-epoch weights
(as Dassl's train.py does) unless `--test_after_fit false`. The global seed defaults to
`data.seed`, so `--data.seed 2` changes the few-shot draw and the training randomness together.
"""

import argparse
import importlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import open_clip
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from clipadapt import experiments
from clipadapt.data import CLIPDataModule
from clipadapt.data.datamodule import summarize_dataset
from clipadapt.data.readers import resolve_dataset
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import AdaptationModule
from clipadapt.models.backbone import PretrainedWeightsUnavailableError, check_weights


class ClipAdaptCLI(LightningCLI):
    """LightningCLI with the data -> model links and the protocol's defaults."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Known only once the datamodule has read its split file.
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.link_arguments("data.templates", "model.init_args.templates", apply_on="instantiate")
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Test the last-epoch model after fit.")

    def before_instantiate_classes(self) -> None:
        if self._get(self.config, "seed_everything") is False:  # not given: follow the data seed
            seed = self._get(self.config, "data.seed")
            seed_everything(seed, workers=True)
            self.config[self.subcommand]["seed_everything"] = seed

    def instantiate_classes(self) -> None:
        # Bad input (unknown model or dataset, missing files, weights unavailable offline) ends in
        # one line that says what to fix, not in a traceback from deep inside jsonargparse.
        try:
            model = self._get(self.config, "model.init_args")
            check_weights(model.arch, model.pretrained)
            super().instantiate_classes()
        except (FileNotFoundError, ValueError, PretrainedWeightsUnavailableError, ClipAdaptError) as err:
            sys.exit(f"clipadapt: error: {err}")

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ClipAdaptError as err:  # bad input met while running (a file, a checkpoint): one line
            sys.exit(f"clipadapt: error: {err}")

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


def data_main(argv: Sequence[str]) -> None:
    """`clipadapt data check`: validate a dataset root and print what a run would see."""
    parser = argparse.ArgumentParser(prog="clipadapt data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a CoOp-layout root; print classes and split counts")
    check.add_argument("--root", required=True, help="folder that holds the dataset folders (CoOp's $DATA)")
    check.add_argument("--dataset", required=True, help="dataset name, e.g. oxford_pets or OxfordPets")
    check.add_argument("--num-shots", type=int, default=0, help="also draw K shots per class (0: skip)")
    check.add_argument("--seed", type=int, default=1, help="seed of the few-shot draw")
    args = parser.parse_args(argv)
    try:
        report = summarize_dataset(args.root, args.dataset, num_shots=args.num_shots, seed=args.seed)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"clipadapt data check: {err}")
    print(report)


def export_main(argv: Sequence[str]) -> None:
    """`clipadapt export`: a checkpoint's tuned weights as a plain open_clip state dict."""
    parser = argparse.ArgumentParser(
        prog="clipadapt export",
        description="Write a fit checkpoint's model as a plain open_clip state dict: "
        "open_clip.create_model(ARCH, pretrained=OUT) loads it (methods that add no parameters, e.g. CLIP-AST).",
    )
    parser.add_argument("--ckpt", required=True, help="a checkpoint written by `clipadapt fit`")
    parser.add_argument("--out", required=True, help="the state dict file to write (.pt)")
    args = parser.parse_args(argv)
    checkpoint = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    if "clipadapt" not in checkpoint or "hyper_parameters" not in checkpoint:
        sys.exit(f"clipadapt export: {args.ckpt} is not a checkpoint written by `clipadapt fit`")
    module_name, _, class_name = checkpoint["clipadapt"]["class_path"].rpartition(".")
    method = getattr(importlib.import_module(module_name), class_name)
    # No weights are downloaded (pretrained=None) and no optimizer is needed: the state dict has everything.
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_") and k != "optimizer"}
    tag = hparams.get("pretrained")
    module = method(**(hparams | {"pretrained": None}))
    module.on_load_checkpoint(checkpoint)  # method state (e.g. a selection) before the weights
    module.load_state_dict(checkpoint["state_dict"])
    state = module.export_state_dict()
    torch.save(state, args.out)

    arch = hparams["arch"]
    quick_gelu = isinstance(tag, str) and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    extra = ", force_quick_gelu=True" if quick_gelu and not open_clip.get_model_config(arch).get("quick_gelu") else ""
    print(f"wrote {args.out} ({type(module).__name__}, arch {arch})")
    added = [key for key in state if key not in module.clip.model.state_dict()]
    if added:  # prompts: plain open_clip has no seam for them, say what the file holds instead
        holds = (type(module).export_state_dict.__doc__ or "").strip().splitlines()[0]
        print(f"it holds {holds[0].lower() + holds[1:]}")
        print(
            f"{len(added)} of its tensors ({', '.join(added[:3])}, ...) need clipadapt's encoders, not plain open_clip"
        )
    else:
        print(f"load it with: open_clip.create_model({arch!r}, pretrained={args.out!r}{extra})")
    if arch.startswith("clipadapt-"):
        print("(a clipadapt test arch: `import clipadapt.models` first, it registers the config with open_clip)")


def sweep_main(argv: Sequence[str]) -> None:
    """`clipadapt sweep`: one config over datasets x shots x seeds (x grid); resumable, local or one job per run."""
    parser = argparse.ArgumentParser(
        prog="clipadapt sweep",
        allow_abbrev=False,
        description="Run `clipadapt fit` for every dataset x shots x seed (x --grid value) into "
        "OUT/<method>/<protocol>/<dataset>/shots_<K>/seed_<S>/, skipping finished runs (test_metrics.json exists). "
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
        if args.dry_run:
            print(f"  todo {run_dir}")
        elif args.jobs:
            job = Path(args.jobs) / ("__".join(run.relpath().parts) + ".sh")
            job.parent.mkdir(parents=True, exist_ok=True)
            job.write_text(experiments.job_script(fit, run_dir, header))
            print(f"  wrote {job}")
        else:
            print(f"[{i}/{len(todo)}] {run_dir}", flush=True)
            if run_dir.exists():  # an interrupted attempt: start it over, stale checkpoints and events included
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
    results = experiments.read_results(Path(args.runs))
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


COMMANDS = {"data": data_main, "export": export_main, "sweep": sweep_main, "report": report_main}


def main(args: ArgsType = None) -> None:
    """Console entry point."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv and argv[0] in COMMANDS:
        COMMANDS[argv[0]](argv[1:])
        return
    ClipAdaptCLI(
        AdaptationModule,
        CLIPDataModule,
        subclass_mode_model=True,  # the config picks the method by class_path
        auto_configure_optimizers=False,  # methods build their optimizer per stage
        seed_everything_default=False,  # replaced by data.seed in before_instantiate_classes
        save_config_kwargs={"overwrite": True},
        args=args,  # None: LightningCLI reads sys.argv itself
    )


if __name__ == "__main__":
    main()
