"""Benchmark: a sweep of zero-shot + linear probe + RAda EFT over seeds x shots, with and without the feature cache.

    python benchmarks/feature_cache.py                      # clipadapt-tiny, 3 seeds x 2 shot counts, CPU
    python benchmarks/feature_cache.py --arch ViT-B-16 --image-size 224 --test-per-class 4

Every run gets the same frozen image tower (one weights file, random init), a synthetic CoOp-layout
dataset is written to a temporary folder, and the runs go through `Trainer.fit` / `Trainer.test` as
the CLI would run them. Printed: the images encoded in validation and test loops (counted at the
tower), the sweep's wall time both ways, their ratio, and whether every test accuracy is the same.
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from machine import describe

from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.methods import LinearProbe, ZeroShotCLIP
from clipadapt.methods.rada import RAda
from clipadapt.models import CLIPBackbone

ENCODED = {"n": 0}


def count_encodes() -> None:
    encode = CLIPBackbone.encode_image

    def counted(backbone: CLIPBackbone, images: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if not torch.is_grad_enabled() or not backbone.training:
            ENCODED["n"] += len(images)
        return encode(backbone, images, *args, **kwargs)

    CLIPBackbone.encode_image = counted


def sweep(args: argparse.Namespace, root: Path, weights: str, cache: str | None) -> tuple[float, list]:
    results = []
    start = time.perf_counter()
    for seed in range(1, args.seeds + 1):
        for shots in args.shots:
            data = CLIPDataModule(root=str(root), dataset="oxford_pets", num_shots=shots, seed=seed,
                                  image_size=args.image_size, batch_size=4, num_workers=0, eval_sets=["base", "novel"],
                                  cache_dir=str(root / "draws"), feature_cache=cache)  # fmt: skip
            for method, epochs, extra in ((ZeroShotCLIP, 0, {}), (LinearProbe, args.epochs, {}),
                                          (RAda, args.epochs, {"prompts": "simple", "feature_chunk": 16})):  # fmt: skip
                L.seed_everything(seed, verbose=False)  # the same init, shuffles and augmentations both ways
                model = method(data.classnames, data.templates, arch=args.arch, pretrained=weights, **extra,
                               optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
                trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
                                    enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                    num_sanity_val_steps=0, check_val_every_n_epoch=1, default_root_dir=root)  # fmt: skip
                if epochs:
                    trainer.fit(model, data)
                results.append(trainer.test(model, data, verbose=False)[0])
    return time.perf_counter() - start, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="clipadapt-tiny")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    print(describe("cpu"))
    count_encodes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, "oxford_pets", test_per_class=args.test_per_class, image_size=args.image_size)
        weights = str(root / "weights.pt")
        torch.save(CLIPBackbone(args.arch, None).model.state_dict(), weights)
        runs = {}
        for name, cache in (("no cache", None), ("feature_cache", str(root / "features"))):
            ENCODED["n"] = 0
            seconds, results = sweep(args, root, weights, cache)
            runs[name] = (seconds, results, ENCODED["n"])
            print(
                f"{name:14s} {seconds:7.1f} s, {ENCODED['n']:6d} images through the frozen tower without grad (eval + RAda's chunks)"
            )
    (plain_s, plain, _), (cached_s, cached, _) = runs["no cache"], runs["feature_cache"]
    print(f"{args.arch}: {args.seeds} seeds x shots {args.shots} x 3 methods; wall time no cache / cache = "
          f"{plain_s / cached_s:.2f}x; identical test metrics: {plain == cached}")  # fmt: skip


if __name__ == "__main__":
    main()
