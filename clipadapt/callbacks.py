"""Lightning callbacks a config can add (`trainer.callbacks`)."""

import json
import os

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from clipadapt.methods.base import harmonic_mean

__all__ = ["ZeroShotComparison"]


class ZeroShotComparison(L.Callback):
    """Scores the test sets once before training (the zero-shot model) and prints them beside the final test.

    The zero-shot accuracies go to `zero_shot_metrics.json` in the run folder and to the logger as
    `zero_shot/<set>/acc`; after `test`, one table shows zero-shot and adapted accuracy per test set
    (and HM for base-to-novel). Under DDP each rank scores its share of the test images and the counts are summed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.zero_shot: dict[str, float] = {}

    @torch.no_grad()
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        accs = {}
        for eval_set, loader in zip(datamodule.eval_sets, datamodule.test_dataloader(), strict=True):
            counts = torch.zeros(2, device=pl_module.device)  # correct, total
            for images, labels in loader:
                logits = pl_module.class_logits(images.to(pl_module.device), eval_set.classnames, eval_set.templates)
                counts[0] += (logits.argmax(-1) == labels.to(logits.device)).sum()
                counts[1] += labels.numel()
            correct, total = trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # each rank scored its share
            accs[eval_set.name] = 100.0 * correct / max(total, 1)
        pl_module._text_cache.clear()  # encoded outside any loop: let training start from a clean cache
        pl_module.train(was_training)
        if "base" in accs and "novel" in accs:
            accs["hm"] = harmonic_mean(accs["base"], accs["novel"])
        self.zero_shot = accs
        for logger in trainer.loggers:
            logger.log_metrics({f"zero_shot/{k}/acc": v for k, v in accs.items()}, step=0)
        if trainer.is_global_zero and trainer.log_dir is not None:
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, "zero_shot_metrics.json"), "w") as f:
                json.dump(accs, f, indent=1)
        rank_zero_info("zero-shot: " + ", ".join(f"{k} {v:.1f}" for k, v in accs.items()))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.zero_shot:
            return
        metrics = trainer.callback_metrics
        rows = []
        for name, before in self.zero_shot.items():
            key = "test/hm" if name == "hm" else f"test/{name}/acc"
            if key in metrics:
                after = float(metrics[key])
                rows.append(f"  {name:<8} {before:>9.1f} {after:>9.1f} {after - before:>+8.1f}")
        if rows:
            header = f"  {'set':<8} {'zero-shot':>9} {'adapted':>9} {'change':>8}"
            rank_zero_info("\n".join(["accuracy (%), before and after adaptation:", header, *rows]))
