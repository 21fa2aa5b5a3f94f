"""Behaviour tests' shared runner: a method fitted on the pretrained toy CLIP, its accuracies per evaluation set.

`fit_toy(Method, root, domain, ...)` trains the real method through a Lightning Trainer on one toy
domain (16 shots of the base classes by default) and returns its test accuracies, e.g.
{"base": 71.2, "novel": 50.5, "hm": 59.1, "toy": 88.0}; `zero_shot(root, domain)` is the same
protocol without training (cached per process). Both print nothing and write nothing but the toy data.
"""

import functools
from pathlib import Path
from typing import Any

import lightning as L
import torch
from doubles import QUIET

from clipadapt.data import CLIPDataModule
from clipadapt.methods import AdaptationModule, ZeroShotCLIP

TOY = {"arch": "clipadapt-toy", "pretrained": "toy"}  # the pretrained toy CLIP shipped in the package
EVAL_SETS = ("base", "novel", "toy")  # `toy`: the pretraining domain, all 32 classes (forgetting)


def toy_data(root: Path | str, domain: str, seed: int = 1, **overrides: Any) -> CLIPDataModule:
    """The toy `domain` as the demo reads it: 16 shots of the base classes, 32 px, loaded in the main process."""
    kwargs = dict(
        dataset=domain,
        num_shots=16,
        seed=seed,
        subsample="base",
        eval_sets=list(EVAL_SETS),
        image_size=32,
        batch_size=32,
        eval_batch_size=400,
        num_workers=0,
        train_crop_scale=(0.5, 1.0),
        cache_dir=str(Path(root) / ".fewshot"),
    )
    return CLIPDataModule(root=str(root), **(kwargs | overrides))


def quiet(root: Path | str) -> dict[str, Any]:
    """Trainer options: one CPU process, no logger or checkpoint; run files (test_metrics.json) under `root`/runs."""
    return QUIET | dict(devices=1, default_root_dir=str(Path(root) / "runs"))


def accuracies(trainer: L.Trainer, model: L.LightningModule, data: CLIPDataModule) -> dict[str, float]:
    """{set name: top-1 %} (and `hm` for base-to-novel) of `model` on every evaluation set of `data`."""
    trainer.test(model, data, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    accs = {s.name: metrics[f"test/{s.name}/acc"] for s in data.eval_sets}
    if "test/hm" in metrics:
        accs["hm"] = metrics["test/hm"]
    return accs


def fit_model(
    method: type[AdaptationModule],
    root: Path | str,
    domain: str = "toy_dusk",
    seed: int = 1,
    epochs: int = 5,
    lr: float = 1e-3,
    data: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    **model_args: Any,
) -> tuple[L.Trainer, AdaptationModule, CLIPDataModule]:
    """Fit `method` (AdamW at `lr`, `epochs` epochs; `epochs=0`: no fit) on the toy `domain` from the toy CLIP."""
    L.seed_everything(seed, verbose=False)
    datamodule = toy_data(root, domain, seed, **(data or {}))
    kwargs = TOY | {"optimizer": functools.partial(torch.optim.AdamW, lr=lr)} | model_args
    model = method(classnames=datamodule.classnames, templates=datamodule.templates, **kwargs)
    run = L.Trainer(**(quiet(root) | dict(max_epochs=epochs) | (trainer or {})))
    if epochs:
        run.fit(model, datamodule)
    return run, model, datamodule


def fit_toy(
    method: type[AdaptationModule], root: Path | str, domain: str = "toy_dusk", **kwargs: Any
) -> dict[str, float]:
    """`fit_model`, then the test accuracies of the fitted model (`epochs=0`: of the model as built)."""
    return accuracies(*fit_model(method, root, domain, **kwargs))


@functools.cache
def _zero_shot(root: str, domain: str, prompts: str) -> tuple[tuple[str, float], ...]:
    return tuple(fit_toy(ZeroShotCLIP, root, domain, epochs=0, prompts=prompts).items())


def zero_shot(root: Path | str, domain: str = "toy_dusk", prompts: str = "simple") -> dict[str, float]:
    """Zero-shot accuracies of the toy CLIP on the same evaluation sets as `fit_toy` (cached per process)."""
    return dict(_zero_shot(str(root), domain, prompts))
