"""The LightningCLI behind `clipadapt fit / validate / test / predict` (`clipadapt.cli` dispatches to it).

Imported only when one of those subcommands runs, so that `clipadapt --help` and our own subcommands
start without torch and Lightning.

`--ckpt_path FILE`: LightningCLI replaces the config's model arguments with the checkpoint's. Here a
checkpoint of another method is refused, and so is a given model argument (set by a flag or a config
file, not a default) that the checkpoint's would replace with another value; when a checkpoint is evaluated,
the method's `test_time_args` take the given value instead (decision for issue 10 §2: only arguments
that shape nothing but the evaluation). Every checkpoint is read with weights_only=True
(`clipadapt.checkpoints`); the checks apply to a file path, Lightning's `last` / `hpc` keywords and
URLs are only loaded safely.

Defaults every run gets (issue 10 §5, §6), each dropped when the user configures its own:
- `RUN/checkpoints/last.ckpt`, written at the end of every training epoch (after that epoch's
  validation), replaced in place; a ModelCheckpoint in `trainer.callbacks` replaces this one (give it
  `save_last: true` to keep resuming), `trainer.enable_checkpointing false` drops it.
- Checkpoints are written atomically (`clipadapt.checkpoints.AtomicCheckpointIO`): a temp file in the
  same folder, then a rename, so a file on disk is always a whole checkpoint.
- `fit --ckpt_path RUN/checkpoints/last.ckpt` continues in RUN (the same TensorBoard folder), not in a
  new version_N beside it, when the logger is the default one.
- A LearningRateMonitor (TensorBoard `lr-<Optimizer>`), `log_every_n_steps: 1` (a 16-shot epoch has
  fewer steps than Lightning's 50), `hp_metric` = the final test metric (`AdaptationModule`).
"""

import importlib
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from clipadapt import checkpoints
from clipadapt.data import CLIPDataModule
from clipadapt.errors import ClipAdaptError
from clipadapt.methods import AdaptationModule
from clipadapt.models.backbone import PretrainedWeightsUnavailableError, check_weights

TRAINER_DEFAULTS = {"log_every_n_steps": 1}


def run(args: ArgsType = None) -> None:
    """`clipadapt fit|validate|test|predict ...` (`args` None: sys.argv)."""
    ClipAdaptCLI(
        AdaptationModule,
        CLIPDataModule,
        subclass_mode_model=True,  # the config picks the method by class_path
        auto_configure_optimizers=False,  # methods build their optimizer per stage
        seed_everything_default=False,  # replaced by data.seed in before_instantiate_classes
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,  # None: LightningCLI reads sys.argv itself
    )


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
            try:
                seed_everything(seed, workers=True)
            except ValueError as err:  # runs before instantiate_classes' own one-line handling
                sys.exit(f"clipadapt: error: data.seed {seed} cannot seed the run ({err}); the protocol uses 1, 2, 3")
            self.config[self.subcommand]["seed_everything"] = seed

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        self._args = args  # parsed again without defaults (`_given_model_args`) when a checkpoint is given
        super().parse_arguments(parser, args)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would take the checkpoint's model class and arguments over the config's without a
        # word: another method, or a given argument that would not take effect, is refused here instead.
        try:
            self._restore_checkpoint_arguments()
        except (FileNotFoundError, ClipAdaptError) as err:
            sys.exit(f"clipadapt: error: {err}")

    def _restore_checkpoint_arguments(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            raise ClipAdaptError(
                "--weights_only false would unpickle any object a checkpoint names, which can run code from it: "
                "drop the flag (clipadapt checkpoints load with weights_only=True)"
            )
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS or "://" in str(ckpt_path):
            return  # Lightning resolves these; it loads them with weights_only=True (`_prepare_subcommand_kwargs`)
        checkpoint = checkpoints.read_checkpoint(ckpt_path, "--ckpt_path")
        method = _import(config.model.class_path)
        name, saved = f"{method.__module__}.{method.__qualname__}", checkpoints.method_path(checkpoint)
        if saved != name:
            raise ClipAdaptError(
                f"--ckpt_path {ckpt_path} is a checkpoint of {saved}, but the config's model is {name}: pass a "
                f"checkpoint of {method.__name__}, or the config of the run that wrote it (its config.yaml)"
            )
        hparams = {k: v for k, v in checkpoint.get("hyper_parameters", {}).items() if not k.startswith("_")}
        if not hparams:
            return
        # What LightningCLI does: the checkpoint's arguments over the config's.
        restored = {subcommand: {"model": {"class_path": config.model.class_path, "dict_kwargs": hparams}}}
        merged = self.parser.parse_object(restored, self.config)
        unknown = sorted(merged[subcommand].model.get("dict_kwargs") or {})
        if unknown:
            raise ClipAdaptError(
                f"--ckpt_path {ckpt_path} saved arguments that {method.__name__} does not take ({', '.join(unknown)}): "
                "it was written by another version of clipadapt; use that version, or start a new run"
            )
        before, after = config.model.init_args, merged[subcommand].model.init_args
        allowed = method.test_time_args if subcommand != "fit" else frozenset()
        refused = []
        for key in sorted(self._given_model_args(subcommand) - LINKED_MODEL_ARGS):
            if before.get(key) == after.get(key):
                continue
            if key in allowed:
                after[key] = before[key]  # shapes only the evaluation: the given value takes effect
            else:
                refused += _differences(f"model.init_args.{key}", before.get(key), after.get(key))
        if refused:
            hint = (
                f"at test time only {', '.join(sorted(allowed))} may differ from the checkpoint"
                if allowed
                else "to train with other values, start a new run without --ckpt_path"
            )
            raise ClipAdaptError(
                f"--ckpt_path restores the model's arguments from {ckpt_path}, so {', '.join(refused)} would not "
                f"take effect: drop {'it' if len(refused) == 1 else 'them'} ({hint})"
            )
        self.config = merged

    def _given_model_args(self, subcommand: str) -> set[str]:
        """The model arguments a config file or a flag set (defaults excluded)."""
        parse = self.parser.parse_object if isinstance(self._args, (dict, Namespace)) else self.parser.parse_args
        given = parse(self._args, defaults=False).get(f"{subcommand}.model.init_args")
        return set(vars(given)) if isinstance(given, Namespace) else set()

    def instantiate_classes(self) -> None:
        # Bad input (unknown model or dataset, missing files, weights unavailable offline) ends in
        # one line that says what to fix, not in a traceback from deep inside jsonargparse.
        try:
            _check_folder(self._get(self.config, "trainer.default_root_dir"), "trainer.default_root_dir")
            model = self._get(self.config, "model.init_args")
            check_weights(model.arch, model.pretrained, model_config=getattr(model, "model_config", None))
            super().instantiate_classes()
        except (FileNotFoundError, ValueError, PretrainedWeightsUnavailableError, ClipAdaptError) as err:
            sys.exit(f"clipadapt: error: {_reason(err)}")

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            # Explicit, so that TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD cannot turn it off; also covers `last` / `hpc`.
            kwargs["weights_only"] = True
        return kwargs

    def _run_subcommand(self, subcommand: str) -> None:
        try:
            super()._run_subcommand(subcommand)
        except ClipAdaptError as err:  # bad input met while running (a file, a checkpoint): one line
            sys.exit(f"clipadapt: error: {err}")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        given = config.get("callbacks") or []
        given = [*(given if isinstance(given, list) else [given]), *callbacks]
        extra = []
        if config.get("enable_checkpointing") is not False and not any(isinstance(c, ModelCheckpoint) for c in given):
            # filename "last" with top-1 and no monitor: one file, replaced every epoch (save_last alone would
            # add a second, identical epoch=N file); at each epoch's end, also when validation is every 10 epochs.
            extra.append(ModelCheckpoint(filename="last", enable_version_counter=False, save_on_train_epoch_end=True))
        if config.get("logger") is not False and not any(isinstance(c, LearningRateMonitor) for c in given):
            extra.append(LearningRateMonitor())
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            config["plugins"] = [*plugins, checkpoints.AtomicCheckpointIO()]
        if config.get("logger") in (None, True):
            resumed = self._resumed_run()
            if resumed is not None:  # the default logger, continued in the checkpoint's own run folder
                config["logger"] = TensorBoardLogger(
                    resumed.parent.parent, name=resumed.parent.name, version=resumed.name
                )
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    def _resumed_run(self) -> Path | None:
        """RUN when `fit --ckpt_path RUN/checkpoints/X.ckpt` resumes a run that the default logger wrote."""
        if self.subcommand != "fit":
            return None
        ckpt_path = self._get(self.config, "ckpt_path")
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS or "://" in str(ckpt_path):
            return None
        folder = Path(ckpt_path).expanduser().resolve().parent
        run = folder.parent
        if folder.name != "checkpoints" or not any((run / name).is_file() for name in ("hparams.yaml", "config.yaml")):
            return None
        return run

    def after_fit(self) -> None:
        if self._get(self.config, "test_after_fit"):
            self.trainer.test(self.model, datamodule=self.datamodule)


LIGHTNING_CKPT_KEYWORDS = ("last", "hpc", "registry")  # `--ckpt_path` values Lightning resolves itself
LINKED_MODEL_ARGS = {"classnames", "templates"}  # set from the datamodule at instantiation, never from a checkpoint


def _reason(err: BaseException) -> str:
    """The message of a ClipAdaptError that jsonargparse wrapped while building a class, else `err`'s own."""
    cause: BaseException | None = err
    while cause is not None:
        if isinstance(cause, ClipAdaptError):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return str(err)


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _differences(key: str, given: Any, saved: Any) -> list[str]:
    """`key=given (checkpoint: saved)` for each differing leaf (an optimizer's lr, not the whole optimizer)."""
    if isinstance(given, Namespace) and isinstance(saved, Namespace):
        mine, theirs = dict(given.items()), dict(saved.items())
        leaves = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        return [f"{key}.{k}={mine.get(k)!r} (checkpoint: {theirs.get(k)!r})" for k in leaves]
    return [f"{key}={given!r} (checkpoint: {saved!r})"]


def _check_folder(path: str | None, name: str) -> None:
    """Fail now if `path` (created on demand) is, or lies inside, a file."""
    if not path:
        return
    for folder in (Path(path).expanduser(), *Path(path).expanduser().parents):
        if folder.exists():
            if not folder.is_dir():
                raise ClipAdaptError(f"{name} {path}: {folder} is a file, not a folder: pass a folder path")
            return
