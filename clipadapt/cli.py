"""The `clipadapt` command.

    clipadapt fit  --config configs/ast_fewshot.yaml --data.root DATA --data.dataset oxford_pets
    clipadapt test --config configs/zeroshot.yaml --data.root DATA --data.dataset eurosat
    clipadapt data check --root DATA --dataset oxford_pets --num-shots 16 --seed 1
    clipadapt export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --out tuned.pt

fit / validate / test / predict are LightningCLI subcommands (the method is the config's
`model.class_path`); `data` and `export` are ours. `fit` ends with the protocol's test of the last-epoch weights
(as Dassl's train.py does) unless `--test_after_fit false`. The global seed defaults to
`data.seed`, so `--data.seed 2` changes the few-shot draw and the training randomness together.
"""

import argparse
import importlib
import sys
from collections.abc import Sequence

import open_clip
import torch
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from clipadapt.data import CLIPDataModule
from clipadapt.data.datamodule import summarize_dataset
from clipadapt.methods import AdaptationModule


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
    module.load_state_dict(checkpoint["state_dict"])
    torch.save(module.export_state_dict(), args.out)

    arch = hparams["arch"]
    quick_gelu = isinstance(tag, str) and open_clip.get_pretrained_cfg(arch, tag).get("quick_gelu", False)
    extra = ", force_quick_gelu=True" if quick_gelu and not open_clip.get_model_config(arch).get("quick_gelu") else ""
    print(f"wrote {args.out} ({type(module).__name__}, arch {arch})")
    print(f"load it with: open_clip.create_model({arch!r}, pretrained={args.out!r}{extra})")
    if arch.startswith("clipadapt-"):
        print("(a clipadapt test arch: `import clipadapt.models` first, it registers the config with open_clip)")


COMMANDS = {"data": data_main, "export": export_main}


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
        args=argv,
    )


if __name__ == "__main__":
    main()
