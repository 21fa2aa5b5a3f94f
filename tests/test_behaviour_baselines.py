"""Behaviour of the baselines on the pretrained toy world (issues 11 §4, 12, 13): they learn, and keep what they should.

Every run adapts the shipped toy CLIP (`TOY`) to `toy_dusk` (dark, blue-tinted: a class-agnostic shift), base
classes, 16 shots, seed 1, on a short schedule through the real data module and `Trainer.fit` / `Trainer.test`:

- every trained (or training-free) baseline lifts base accuracy on the shifted domain clearly above the
  zero-shot model's, measured on the same test images;
- TPT does not lower zero-shot accuracy on the shifted set;
- the known contrasts, measured on the pretraining domain `toy` (all 32 classes, forgetting): KgCoOp keeps more
  of it than CoOp trained with the same settings; WiSE-FT (α = 0.5) more than FT (α = 1, the same fit); LP-FT
  more than FT; PromptSRC more than its prompts without self-consistency and GPA (IVLP).

Not tested, because it does not hold here: KgCoOp keeping more *novel* accuracy than CoOp. `toy_dusk` shifts every
class alike, so what CoOp's context learns about dusk helps the novel classes as much as the base ones (novel,
seeds 1 / 2 / 3: CoOp 68.2 / 67.2 / 64.2, KgCoOp 57.8 / 56.2 / 55.0); the pretraining domain is the contrast.

Why `toy_dusk` and not the class-specific `toy_habitat`: a context shared by every class cannot say "class c sits
on background b_c", so CoOp does not learn there (base, seeds 1 / 2 / 3: 21.0 / 24.2 / 21.8, zero-shot 22.8), while
its class-specific variant (CSC) does (86.2 at seed 1). A test of "learns" needs a shift every method can follow.

The schedules are short (10 epochs of 8 steps at batch 32) with learning rates raised to match; the papers' own
hyperparameters are the configs' and are not what is tested here. Margins were calibrated over seeds 1, 2, 3 with
`python tests/calibrate_baselines.py` (the observed numbers are beside each assert, and in the note
behavebase_results.md); each margin is about half the smallest observed gain, so a method that stops learning
fails and seed noise does not. The file takes 1-2 minutes on one thread (the whole-set TPT check, 30 s more,
is marked slow).
"""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from conftest import TOY
from doubles import QUIET

from clipadapt.data import CLIPDataModule
from clipadapt.methods import (
    LPFT,
    TPT,
    AdaptationModule,
    CLIPAdapter,
    CLIPLoRA,
    CoCoOp,
    CoOp,
    KgCoOp,
    MaPLe,
    PromptSRC,
    TipAdapter,
    TipAdapterF,
    WiSEFT,
    ZeroShotCLIP,
)

DOMAIN = "toy_dusk"  # zero-shot base accuracy ~48 % here, 94 % on the pretraining domain `toy`
SEED = 1
# The runs also tested on the pretraining domain `toy` (forgetting); the others only on base.
FORGETTING = {"ZeroShotCLIP", "CoOp", "KgCoOp", "PromptSRC", "IVLP", "WiSEFT", "LPFT"}


def sgd(lr: float) -> Callable:
    """CoOp's SGD (momentum 0.9, weight decay 5e-4) at `lr`."""
    return partial(torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=5e-4)


def adamw(lr: float, weight_decay: float = 0.01) -> Callable:
    """AdamW at `lr`."""
    return partial(torch.optim.AdamW, lr=lr, weight_decay=weight_decay)


@dataclass(frozen=True)
class Recipe:
    """A short toy-world run of one method: its class, epochs (0: test only) and arguments."""

    method: type[AdaptationModule]
    epochs: int
    kwargs: dict[str, Any] = field(default_factory=dict)


# One context recipe for CoOp and KgCoOp, so that their contrast is the regulariser alone.
CONTEXT = dict(n_ctx=4, context_init="a photo of a", optimizer=sgd(0.05))
DEEP = dict(text_depth=3, image_depth=3, optimizer=sgd(0.01))  # J = 3: every text block, 3 of 4 image blocks
CONSISTENCY = ("image_consistency_weight", "text_consistency_weight", "logit_consistency_weight")  # λ1, λ2, λ3
RECIPES: dict[str, Recipe] = {
    "ZeroShotCLIP": Recipe(ZeroShotCLIP, 0),
    "CoOp": Recipe(CoOp, 10, CONTEXT),
    "KgCoOp": Recipe(KgCoOp, 10, CONTEXT),  # λ = 8, the paper's
    "CoCoOp": Recipe(CoCoOp, 10, dict(optimizer=sgd(0.05))),  # batch 32, not the paper's 1: B x C prompts per step
    "MaPLe": Recipe(MaPLe, 10, dict(prompt_depth=3, optimizer=sgd(0.05))),  # J = 3 of the toy's 3 text blocks
    # Deep prompts diverge at CoOp's lr here (IVLP at 0.05 fell to 17 %): 0.01, ~ the paper's 0.0025 at batch 4 x 8.
    "PromptSRC": Recipe(PromptSRC, 10, dict(DEEP, gpa_mean=7.5, gpa_std=1.0)),  # GPA's μ at 3/4, as 15 of 20 epochs
    # PromptSRC without its knowledge-keeping parts (no self-consistency, no GPA): IVLP, the paper's baseline.
    "IVLP": Recipe(PromptSRC, 10, dict(DEEP, gpa=False, **dict.fromkeys(CONSISTENCY, 0.0))),
    "CLIPAdapter": Recipe(CLIPAdapter, 10, dict(residual_ratio=0.2, optimizer=sgd(0.1))),
    "TipAdapter": Recipe(TipAdapter, 0),  # training-free: α, β searched on the validation split
    "TipAdapterF": Recipe(TipAdapterF, 10, dict(optimizer=adamw(1e-3))),
    "CLIPLoRA": Recipe(CLIPLoRA, 10, dict(optimizer=adamw(2e-3))),
    # One fit serves FT and WiSE-FT: the ensemble is applied only at evaluation (`FT.ensembling`).
    "WiSEFT": Recipe(WiSEFT, 10, dict(wise_alpha=0.5, optimizer=adamw(1e-4, 0.1))),
    "LPFT": Recipe(LPFT, 10, dict(probe_epochs=3, probe_lr=1e-3, finetune_lr=1e-4, optimizer=adamw(1e-4, 0.1))),
}


def toy_data(root: Path, seed: int, eval_sets: list[str]) -> CLIPDataModule:
    """`DOMAIN`, base classes, 16 shots, the demo's transforms (32 px, crops of scale 0.5-1, flips)."""
    return CLIPDataModule(
        root=str(root), dataset=DOMAIN, num_shots=16, seed=seed, subsample="base", eval_sets=eval_sets,
        image_size=32, batch_size=32, eval_batch_size=400, num_workers=0, train_crop_scale=(0.5, 1.0),
        cache_dir=str(root / "fewshot"),
    )  # fmt: skip


def seeded(seed: int) -> None:
    """Seed torch, numpy and random as the CLI does, without leaving PL_GLOBAL_SEED behind for other tests."""
    L.seed_everything(seed, verbose=False)
    os.environ.pop("PL_GLOBAL_SEED", None)


def adapt(root: Path, out: Path, name: str, seed: int, eval_sets: list[str]) -> dict[str, dict[str, float]]:
    """Fit (unless training-free) and test `RECIPES[name]`: {run name: {eval set: top-1 %}}.

    A WiSEFT run is tested twice, at its α (`WiSEFT`) and at α = 1 (`FT`): the same fine-tuned weights.
    """
    recipe = RECIPES[name]
    seeded(seed)
    data = toy_data(root, seed, eval_sets)
    model = recipe.method(data.classnames, data.templates, **TOY, **recipe.kwargs)
    trainer = L.Trainer(
        **(QUIET | dict(devices=1, default_root_dir=out, max_epochs=max(recipe.epochs, 1), limit_val_batches=0))
    )
    if recipe.epochs:
        trainer.fit(model, datamodule=data)

    def test() -> dict[str, float]:
        metrics = trainer.test(model, datamodule=data, verbose=False)[0]
        return {key.split("/")[1]: value for key, value in metrics.items() if key.endswith("/acc")}

    results = {name: test()}
    if isinstance(model, WiSEFT):
        model.hparams.wise_alpha = 1.0  # θ = θ_ft: plain FT
        results["FT"] = test()
    return results


def tpt_and_zero_shot(root: Path, seed: int, per_class: int | None) -> tuple[int, int, int]:
    """Correct predictions of TPT (the paper's settings) and of zero-shot CLIP on `DOMAIN`'s base test images.

    Both classify through `class_logits`, as their `test_step` does (TPT tunes each image alone, so a subset of the
    test set gives each image the prediction the whole set would). The first `per_class` test images of each class (None: all 25); returns (TPT correct, zero-shot correct, images).
    """
    data = toy_data(root, seed, ["base"])
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()[0]))  # every base test image: one batch of 400
    if per_class is not None:
        keep = torch.cat([torch.nonzero(labels == c)[:per_class, 0] for c in range(len(data.classnames))])
        images, labels = images[keep], labels[keep]
    test = data.eval_sets[0]
    seeded(seed)
    tpt = TPT(data.classnames, data.templates, **TOY, views=64, select=0.1, steps=1, lr=5e-3, augment="crop",
              view_seed=seed).eval()  # fmt: skip
    zero_shot = ZeroShotCLIP(data.classnames, data.templates, **TOY).eval()
    tuned = tpt.class_logits(images, test.classnames, test.templates).argmax(-1)
    with torch.no_grad():
        plain = zero_shot.class_logits(images, test.classnames, test.templates).argmax(-1)
    return int((tuned == labels).sum()), int((plain == labels).sum()), len(labels)


# ---- the session's runs, made on first use and shared by the tests ----


@pytest.fixture(scope="session")
def accuracy(toy_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], float]:
    """accuracy(run, eval set): top-1 % of one of `RECIPES`' runs (or FT) at `SEED`, each fit once per session."""
    out = tmp_path_factory.mktemp("behaviour_baselines")
    cache: dict[str, dict[str, float]] = {}

    def get(run: str, eval_set: str) -> float:
        if run not in cache:
            recipe = "WiSEFT" if run == "FT" else run
            sets = ["base", "toy"] if recipe in FORGETTING else ["base"]
            cache.update(adapt(toy_root, out, recipe, SEED, sets))
        return cache[run][eval_set]

    return get


# Base accuracy on toy_dusk (%) observed at seeds 1 / 2 / 3, zero-shot 48.2 (the test images are the same for every
# seed; the 16-shot draw and the training noise change). Each margin is about half the smallest observed gain
# (CoCoOp's: about half of 5.8). Re-measured with `python tests/calibrate_baselines.py` on the shipped toy data.
BASE_GAIN = {  # run: the least gain over zero-shot that the test asks for, in points
    "CoOp": 10.0,  # 63.5 / 68.0 / 70.8
    "KgCoOp": 4.0,  # 57.8 / 57.2 / 56.2 (λ = 8 holds it near zero-shot CLIP: the point of KgCoOp)
    "CoCoOp": 3.0,  # 54.0 / 64.0 / 60.8
    "MaPLe": 10.0,  # 72.8 / 76.8 / 78.0
    "PromptSRC": 10.0,  # 75.2 / 69.8 / 75.8
    "CLIPAdapter": 10.0,  # 69.8 / 73.5 / 76.5
    "TipAdapter": 5.0,  # 65.8 / 63.8 / 61.2
    "TipAdapterF": 10.0,  # 71.2 / 70.2 / 67.2
    "CLIPLoRA": 15.0,  # 82.0 / 83.5 / 81.8
    "FT": 20.0,  # 94.5 / 95.0 / 95.5
    "WiSEFT": 15.0,  # 76.8 / 81.2 / 79.8
    "LPFT": 20.0,  # 91.8 / 94.2 / 92.2
}


@pytest.mark.parametrize("run", list(BASE_GAIN))
def test_base_accuracy_on_a_shifted_domain_rises_above_zero_shot(accuracy: Callable, run: str):
    zero_shot, adapted = accuracy("ZeroShotCLIP", "base"), accuracy(run, "base")
    assert adapted >= zero_shot + BASE_GAIN[run], (run, zero_shot, adapted)


def test_kgcoop_keeps_more_pretraining_domain_accuracy_than_coop(accuracy: Callable):
    # toy (32 classes, zero-shot 94.0), seeds 1 / 2 / 3: CoOp 81.6 / 84.2 / 83.1, KgCoOp 94.4 / 93.9 / 94.1
    coop, kgcoop = accuracy("CoOp", "toy"), accuracy("KgCoOp", "toy")
    assert kgcoop >= coop + 4.0, (coop, kgcoop)


def test_wiseft_keeps_more_pretraining_domain_accuracy_than_ft(accuracy: Callable):
    # toy (32 classes, zero-shot 94.0), seeds 1 / 2 / 3: FT 87.9 / 86.8 / 88.4, WiSE-FT 92.8 / 92.5 / 92.8
    ft, wise = accuracy("FT", "toy"), accuracy("WiSEFT", "toy")
    assert wise >= ft + 2.5, (ft, wise)


def test_lpft_keeps_more_pretraining_domain_accuracy_than_ft(accuracy: Callable):
    # LP-FT's claim (a probed head distorts the features less): toy, seeds 1 / 2 / 3: FT 87.9 / 86.8 / 88.4,
    # LP-FT 90.5 / 89.0 / 90.1
    ft, lpft = accuracy("FT", "toy"), accuracy("LPFT", "toy")
    assert lpft >= ft + 0.75, (ft, lpft)


def test_promptsrc_keeps_more_pretraining_domain_accuracy_than_without_self_regulation(accuracy: Callable):
    # The same deep prompts and lr without self-consistency and GPA (IVLP); toy, seeds 1 / 2 / 3:
    # IVLP 73.4 / 75.0 / 76.9, PromptSRC 91.8 / 90.9 / 89.4
    ivlp, promptsrc = accuracy("IVLP", "toy"), accuracy("PromptSRC", "toy")
    assert promptsrc >= ivlp + 7.0, (ivlp, promptsrc)


def test_tpt_does_not_lower_zero_shot_accuracy_on_a_shifted_set(toy_root: Path):
    # The paper's settings (64 views, ρ = 0.1, one AdamW step at 5e-3). 8 images per base class (128 of 400),
    # seeds 1 / 2 / 3 (the views' seed): zero-shot 66 correct; TPT 66 / 67 / 66, so it neither lowers nor raises it.
    tuned, plain, images = tpt_and_zero_shot(toy_root, SEED, per_class=8)
    assert tuned >= plain - 1, (tuned, plain, images)


@pytest.mark.slow  # ~30 s: TPT tunes 400 images one by one on 64 views each
def test_tpt_does_not_lower_zero_shot_accuracy_on_the_whole_shifted_test_set(toy_root: Path):
    # 400 images, seeds 1 / 2 / 3: zero-shot 193 correct (48.2 %); TPT 193 / 194 / 195
    tuned, plain, images = tpt_and_zero_shot(toy_root, SEED, per_class=None)
    assert tuned >= plain - 2, (tuned, plain, images)
