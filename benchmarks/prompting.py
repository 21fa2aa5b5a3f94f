"""Benchmark: the prompt learners' training cost, and what batch CoCoOp's per-image text encoding allows.

    python benchmarks/prompting.py                                   # all five, tiny model on CPU
    python benchmarks/prompting.py --arch ViT-B-16 --classes 100     # ViT-B/16, random init
    python benchmarks/prompting.py --memory-only --arch ViT-B-16 --classes 100 --batches 1 2 4 --precision bf16-mixed

Memory is measured without a GPU: the bytes of the distinct tensors autograd saves for backward in
one training step (frozen weights excluded, autocast copies included) - the activation memory that
grows with the batch, on any device. CoCoOp's is nearly linear in B x C (the text tower runs once per
image and class), so the table ends with the largest batch whose activations fit a given GPU next to
the frozen weights. Class names are ImageNet's (their lengths set the truncated prompt length).
"""

import argparse
import statistics
import sys
from collections.abc import Callable

import open_clip
import torch

from clipadapt.methods import CoCoOp, CoOp, KgCoOp, MaPLe, PromptSRC

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from methods import autocast, seconds, training_rate  # noqa: E402  (the shared helpers of benchmarks/)

METHODS: dict[str, Callable[..., torch.nn.Module]] = {
    "coop": CoOp,
    "cocoop": CoCoOp,
    "kgcoop": KgCoOp,
    "maple": MaPLe,
    "promptsrc": PromptSRC,
}
GPUS_GIB = (24, 40, 80, 141)  # RTX 4090 / A100 40G / A100-H100 80G / H200


def build(name: str, args: argparse.Namespace, device: torch.device) -> torch.nn.Module:
    classnames = list(open_clip.IMAGENET_CLASSNAMES[: args.classes])
    model = METHODS[name](classnames, ["a photo of a {}."], arch=args.arch, pretrained=None).to(device)
    model._apply_stage("train")  # freezes CLIP, as fit does
    return model


def activation_bytes(model: torch.nn.Module, batch: int, args: argparse.Namespace, device: torch.device) -> int:
    """Bytes autograd keeps for backward in one training step (distinct storages, parameters excluded)."""
    size = model.clip.image_size
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (batch,), device=device)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(args, device):
        loss = sum(model.training_losses(images, labels).values())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def eval_rate(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> float:
    """Test images/s over `args.classes` classes: text encoded once per evaluation, CoCoOp's once per image."""
    size = model.clip.image_size
    images = torch.randn(args.eval_batch_size, 3, size, size, device=device)
    names, templates = list(model.hparams.classnames), model.hparams.templates
    model.eval()
    with torch.inference_mode(), autocast(args, device):
        text = model.encode_classes(names, templates)  # (C, D), as the test loop caches it

    def step() -> None:
        with torch.inference_mode(), autocast(args, device):
            if isinstance(model, CoCoOp):
                model.class_logits(images, names, templates)
            else:
                model.classify(images, text)

    seconds(step, args.warmup, device)
    return args.eval_batch_size / statistics.median(seconds(step, args.iters, device))


def frozen_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.clip.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(METHODS), nargs="+", default=list(METHODS))
    parser.add_argument("--arch", default="clipadapt-tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default="32-true")
    parser.add_argument("--classes", type=int, default=10, help="C, class prompts per step")
    parser.add_argument("--batch-size", type=int, default=4, help="training batch of the rate measurement")
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4], help="CoCoOp batches for memory")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--memory-only", action="store_true", help="only CoCoOp's activation memory per batch")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; arch {args.arch} (random init); precision {args.precision}; C = {args.classes} classes")
    torch.manual_seed(0)
    for name in [] if args.memory_only else args.method:
        model = build(name, args, device)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        train = training_rate(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad]), args, device)
        test = eval_rate(model, args, device)
        memory = activation_bytes(model, args.batch_size, args, device)
        print(
            f"{name:9}: {trainable:>9,} trainable | train {train:8.1f} img/s (batch {args.batch_size}) | "
            f"test {test:8.1f} img/s | activations {memory / 2**20:8.1f} MiB at batch {args.batch_size}"
        )
    if "cocoop" not in args.method and not args.memory_only:
        return
    model = build("cocoop", args, device)
    per_batch = {b: activation_bytes(model, b, args, device) for b in args.batches}
    print(f"\nCoCoOp activation memory, C = {args.classes} classes, {args.precision}:")
    for b, size in per_batch.items():
        print(f"  batch {b:4}: {size / 2**30:8.3f} GiB  ({size / b / 2**20:8.1f} MiB per image)")
    # Linear in B: the slope is the cost per image, the intercept what does not grow (autocast weight copies).
    (b0, m0), (b1, m1) = min(per_batch.items()), max(per_batch.items())
    per_image = (m1 - m0) / (b1 - b0) if b1 > b0 else m1 / b1
    fixed = frozen_bytes(model) + max(0.0, m0 - per_image * b0)  # fp32 weights (+ intercept); SGD state is tiny
    print(f"{per_image / 2**20:.1f} MiB per image, {fixed / 2**30:.2f} GiB fixed (frozen weights + what does not grow)")
    print("largest batch whose weights + activations fit, no headroom for the allocator or kernels' workspace:")
    print("  " + ", ".join(f"{gib} GiB: {max(0, int((gib * 2**30 - fixed) // per_image))}" for gib in GPUS_GIB))


if __name__ == "__main__":
    main()
