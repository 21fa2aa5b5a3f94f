"""Benchmark: RAda EFT training with chunked frozen features vs today's per-step path vs the frozen tower alone.

    python benchmarks/rada_eft.py                                   # clipadapt-tiny and ViT-B-16, CPU sizes
    python benchmarks/rada_eft.py --arch ViT-B-16 --images 32 --chunk 32 --classes 50

At the paper's batch size 1, today's path runs the frozen image tower once per optimizer step, one image
at a time. `feature_chunk` encodes `chunk` training images in one no-grad forward and then takes the
same per-image steps on the cached features. Both run through Lightning's `Trainer.fit` for one epoch
of `images` random tensors (random init weights: the cost does not depend on the values); the epoch
is timed by a callback (setup excluded). The floor is the tower's own eval throughput at the chunk
size: the chunked epoch is printed as a ratio of it and of today's epoch, with the largest difference
of the trained adapters' parameters (float reassociation of the batched forward only). The adapter's
own floor, its optimizer steps on precomputed features in a plain loop (no tower, loader or Lightning),
is printed too: with a small tower (the toy CLIP) it, not the tower, bounds the epoch.
"""

import argparse
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from machine import describe, seconds
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from clipadapt.data.datamodule import StepChunks
from clipadapt.methods.rada import RAda


class Tensors(L.LightningDataModule):
    """Random images in memory, loaded like CLIPDataModule's train loader (shuffle, chunks of steps)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> None:
        super().__init__()
        self.data = TensorDataset(images, labels)
        self.batch_size, self.steps_per_batch = batch_size, 1

    def train_dataloader(self) -> DataLoader:
        steps = BatchSampler(RandomSampler(self.data), self.batch_size, drop_last=True)
        return DataLoader(self.data, batch_sampler=StepChunks(steps, self.steps_per_batch))


class EpochTimer(Callback):
    def on_train_epoch_start(self, *args: object) -> None:
        self.start = time.perf_counter()

    def on_train_epoch_end(self, *args: object) -> None:
        self.seconds = time.perf_counter() - self.start


def epoch(args: argparse.Namespace, arch: str, chunk: int, images: torch.Tensor, labels: torch.Tensor) -> tuple:
    torch.manual_seed(0)
    classnames = [f"class {i}" for i in range(args.classes)]
    model = RAda(classnames, ["a photo of a {}."], arch=arch, pretrained=None, prompts="simple", feature_chunk=chunk,
                 optimizer=lambda p: torch.optim.Adam(p, lr=9e-4, weight_decay=5e-4, fused=args.fused),
                 warmup_epochs=0)  # fmt: skip
    timer = EpochTimer()
    trainer = L.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[timer])  # fmt: skip
    L.seed_everything(1, verbose=False)
    trainer.fit(model, Tensors(images, labels, batch_size=1))
    return timer.seconds, model


def adapter_steps(args: argparse.Namespace, model: RAda, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Seconds for the epoch's optimizer steps on given features in a plain loop: the adapter's own floor."""
    text = model.class_embeddings([f"class {i}" for i in range(args.classes)], ["a photo of a {}."]).float()
    optimizer = torch.optim.Adam(model.adapter.parameters(), lr=9e-4, weight_decay=5e-4, fused=args.fused)
    start = time.perf_counter()
    for step_features, step_labels in zip(features.split(1), labels.to(features.device).split(1), strict=True):
        losses = model._feature_losses(step_features, step_labels, text, True)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    if args.device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(args: argparse.Namespace, arch: str, count: int, chunk: int) -> None:
    probe = RAda(["a"], ["{}"], arch=arch, pretrained=None).to(args.device)
    size = probe.clip.image_size
    images = torch.randn(count, 3, size, size)
    labels = torch.randint(0, args.classes, (count,))
    with torch.no_grad():
        probe.clip.eval()
        batch = images[:chunk].to(args.device)
        probe.clip.encode_image(batch)  # warm-up
        tower = chunk / statistics.median(seconds(lambda: probe.clip.encode_image(batch), args.repeats, args.device))
        features = probe.clip.encode_image(images.to(args.device)).float()  # (N, D) for the adapter's own floor
    floor = count / adapter_steps(args, probe, features, labels)
    today_s, today = epoch(args, arch, 1, images, labels)
    chunked_s, chunked = epoch(args, arch, chunk, images, labels)
    diff = max(
        (a - b).abs().max().item()
        for a, b in zip(today.adapter.parameters(), chunked.adapter.parameters(), strict=True)
    )
    rate_today, rate_chunked = count / today_s, count / chunked_s
    print(f"{arch}: {count} images, {args.classes} classes, batch 1 per step, chunk {chunk}")
    print(f"  frozen tower eval at batch {chunk}:  {tower:9.1f} images/s")
    print(f"  adapter steps alone (no tower):  {floor:9.1f} images/s")
    print(f"  EFT today (tower per step):      {rate_today:9.1f} images/s")
    print(f"  EFT chunked features:            {rate_chunked:9.1f} images/s")
    print(
        f"  chunked / tower eval = {rate_chunked / tower:.2f}x   chunked / adapter alone = {rate_chunked / floor:.2f}x   "
        f"floor min(tower, adapter) / today = {min(tower, floor) / rate_today:.2f}x"
    )
    print(f"  chunked / today = {rate_chunked / rate_today:.2f}x   "
          f"max |adapter difference| = {diff:.2e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default=None, help="one arch (default: clipadapt-tiny, then ViT-B-16)")
    parser.add_argument("--images", type=int, default=None, help="training images in the epoch")
    parser.add_argument("--chunk", type=int, default=None, help="images per frozen forward")
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True, help="fused Adam (the config)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    print(describe(args.device))
    plans = {"clipadapt-tiny": (256, 64), "ViT-B-16": (32, 32)}
    for arch, (count, chunk) in plans.items() if args.arch is None else [(args.arch, (32, 32))]:
        bench(args, arch, args.images or count, args.chunk or chunk)


if __name__ == "__main__":
    main()
