"""Benchmark: training loader images/s from the in-memory uint8 cache vs decoding every file every epoch.

    python benchmarks/loader.py                          # 96 JPEGs of 448x448, 224 px crops, 0 and 2 workers
    python benchmarks/loader.py --source-px 500 --workers 0 --epochs 3

A synthetic CoOp-layout dataset of photo-sized JPEGs is written to a temporary folder; the train
loader of `CLIPDataModule` (RandomResizedCrop + flip, CLIP normalisation, batch 32) is iterated for
`epochs` epochs, with `data.memory_cache_mb` 0 (PIL decode + PIL transforms, today) and with the cache
(decoded once when the loader is made, torchvision v2 on uint8 tensors). The one-off fill is timed apart.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from machine import describe

from clipadapt.data import CLIPDataModule
from clipadapt.data.synthetic import write_synthetic


def epochs_rate(data: CLIPDataModule, epochs: int) -> tuple[float, float]:
    """(seconds to make the loader, median images/s of an epoch)."""
    start = time.perf_counter()
    loader = data.train_dataloader()
    made = time.perf_counter() - start
    rates = []
    for _ in range(epochs):
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        rates.append(count / (time.perf_counter() - start))
    return made, statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source-px", type=int, default=448, help="side of the (square) JPEG files")
    parser.add_argument("--per-class", type=int, default=16, help="train images per class (6 classes)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    print(describe("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, "oxford_pets", train_per_class=args.per_class, val_per_class=0, test_per_class=1,
                        image_size=args.source_px)  # fmt: skip
        for workers in args.workers:
            rates = {}
            for budget in (0, 4096):
                torch.manual_seed(0)
                data = CLIPDataModule(root=str(root), dataset="oxford_pets", num_shots=args.per_class, batch_size=32,
                                      num_workers=workers, image_size=args.image_size, memory_cache_mb=budget,
                                      cache_dir=str(root / "draws"))  # fmt: skip
                made, rate = epochs_rate(data, args.epochs)
                rates[budget] = rate
                name = "memory cache" if budget else "decode per epoch"
                print(f"  workers {workers}, {name:17s}: {rate:8.1f} images/s (loader made in {made:.2f} s)")
            print(f"workers {workers}: memory cache / decode per epoch = {rates[4096] / rates[0]:.2f}x")


if __name__ == "__main__":
    main()
