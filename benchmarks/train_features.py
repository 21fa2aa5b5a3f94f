"""Benchmark: a linear probe fit under `data.train_augment false`, train features looked up vs encoded every step.

    python benchmarks/train_features.py                                  # clipadapt-toy (random init), CPU
    python benchmarks/train_features.py --arch ViT-B-16 --image-size 224 --shots 4 --epochs 3

A synthetic CoOp-layout dataset is written to a temporary folder, and the same fit (same init, same
batches: the run's seed) goes through `Trainer.fit` twice, without validation: once with the lookup
(the train split encoded once, `AdaptationModule._train_lookup`) and once with it off
(`lookup_train_features = False`: the frozen tower encodes every step, as with augmentation).
Printed: the images through the image tower (counted at `encode_image`), the fit's wall time (setup
and the one pass included), their ratio, and the largest difference of the trained heads.
"""

import argparse
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from machine import describe

from clipadapt.data import CLIPDataModule, write_synthetic
from clipadapt.methods import LinearProbe
from clipadapt.models import CLIPBackbone

ENCODED = {"n": 0}


def count_encodes() -> None:
    encode = CLIPBackbone.encode_image

    def counted(backbone: CLIPBackbone, images: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        ENCODED["n"] += len(images)
        return encode(backbone, images, *args, **kwargs)

    CLIPBackbone.encode_image = counted


def fit(args: argparse.Namespace, root: Path, weights: str, lookup: bool) -> tuple[float, int, torch.Tensor]:
    """(wall seconds, images through the tower, trained head) of one linear probe fit."""
    data = CLIPDataModule(root=str(root), dataset="oxford_pets", num_shots=args.shots, image_size=args.image_size,
                          batch_size=args.batch_size, num_workers=0, train_augment=False,
                          cache_dir=str(root / "draws"))  # fmt: skip
    L.seed_everything(1, verbose=False)
    model = LinearProbe(data.classnames, data.templates, arch=args.arch, pretrained=weights,
                        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))  # fmt: skip
    model.lookup_train_features = lookup
    trainer = L.Trainer(accelerator=args.device, devices=1, max_epochs=args.epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=root)  # fmt: skip
    ENCODED["n"] = 0
    start = time.perf_counter()
    trainer.fit(model, data)
    return time.perf_counter() - start, ENCODED["n"], model.head.detach().float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="clipadapt-toy")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(describe(args.device))
    count_encodes()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, "oxford_pets", num_classes=args.classes, train_per_class=args.shots,
                        val_per_class=1, test_per_class=1, image_size=args.image_size)  # fmt: skip
        weights = str(root / "weights.pt")
        torch.save(CLIPBackbone(args.arch, None).model.state_dict(), weights)
        fit(args, root, weights, lookup=True)  # warm-up: first-call costs (decoding libraries, kernels) out
        runs = {name: fit(args, root, weights, lookup) for name, lookup in (("lookup", True), ("every step", False))}
    for name, (seconds, images, _) in runs.items():
        print(f"{name:11s} {seconds:7.2f} s, {images:6d} images through the image tower")
    (fast, _, head), (slow, _, reference) = runs["lookup"], runs["every step"]
    print(f"{args.arch}, {args.classes} classes x {args.shots} shots, batch {args.batch_size}, {args.epochs} epochs: "
          f"every step / lookup = {slow / fast:.2f}x wall; max |head diff| {(head - reference).abs().max():.2e}")  # fmt: skip


if __name__ == "__main__":
    main()
