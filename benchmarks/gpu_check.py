"""GPU check: per method, training and evaluation images/s, MFU and peak memory, with plain open_clip as reference.

    python benchmarks/gpu_check.py --out gpu_check.json                       # ViT-B-16, bf16, cuda
    python benchmarks/gpu_check.py --arch clipadapt-tiny --device cpu --batch-size 4 --eval-batch-size 8 \
        --classes 10 --iters 1 --warmup 1 --out check.json                    # the suite's CPU run

Every method is built with its defaults over random weights (the cost does not depend on the values)
and timed on its own losses: forward, backward and optimizer step over its first stage's trainable
parameters (training), and `class_logits` on a batch (evaluation, eval mode, no grad). Methods that
train nothing (zero-shot, Tip-Adapter, TPT, WiSE-FT) only get the evaluation line; TPT's evaluation
is its per-image test-time tuning. FLOPs of one training / evaluation step are counted by
torch.utils.flop_counter; MFU = achieved FLOP/s ÷ the device's dense bf16 peak (`--peak-tflops`, or
a table of known GPUs; none on CPU). A method that fails records its error and the check goes on.
Everything is written as one JSON (`--out`) and summarised on stdout.

`--compile MODE` adds `compile`: the image tower's evaluation (encode_image, no grad, the precision
above, `--eval-batch-size` images) eager vs `CLIPBackbone(compile=MODE)` on the same weights: the
compiled first call (compile included), both steady-state images/s timed interleaved, their ratio and
the max |difference|. `--methods` with no names skips the methods (gpu_check.sh runs the compile
check as a process of its own, so a slow compile cannot cost the methods their time).
"""

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import open_clip
import torch
from machine import describe, seconds
from torch.utils.flop_counter import FlopCounterMode

from clipadapt.methods import METHODS

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}
EVAL_ONLY = {"ZeroShotCLIP", "TipAdapter", "TPT", "WiSEFT"}
# What a method needs beyond its defaults to be timed in isolation (no Trainer, no data).
OPTIONS: dict[str, dict[str, Any]] = {
    "CLIPAST": {"scheme": "random"},  # stage 2 at the adaptive scheme's cost, without its probe
    "TPT": {},
}
STAGE = {"CLIPAST": "selective", "RAda": "train", "LPFT": None}


def peak_tflops(device: torch.device, given: float | None) -> float | None:
    if given is not None or device.type != "cuda":
        return given
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def flops_of(fn: Callable[[], object]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def prepare(name: str, model: Any, device: torch.device, args: argparse.Namespace) -> None:
    """Give a cache model its few-shot keys, as building the cache from a training split would."""
    if name in ("TipAdapter", "TipAdapterF"):
        count = 16 * args.classes
        model.cache_keys.data = torch.nn.functional.normalize(torch.randn(count, model.clip.embed_dim), dim=-1)
        model.cache_labels = torch.arange(count) % args.classes
    model.to(device)


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    classnames = [f"class {i}" for i in range(args.classes)]
    templates = ["a photo of a {}."]
    model = METHODS[name](classnames, templates, arch=args.arch, pretrained=None, **OPTIONS.get(name, {}))
    prepare(name, model, device, args)
    size = model.clip.image_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    result: dict[str, Any] = {}
    if name not in EVAL_ONLY:
        stage = STAGE.get(name) or model.stages[0].name
        model.stage = stage
        params = model._apply_stage(stage)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        images = torch.randn(args.batch_size, 3, size, size, device=device)
        labels = torch.randint(0, args.classes, (args.batch_size,), device=device)
        model.train()

        def train_step() -> None:
            with autocast:
                loss = sum(model.training_losses(images, labels).values())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds(train_step, args.warmup, device)
        result["train_flops_per_image"] = flops_of(train_step) / args.batch_size
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step = statistics.median(seconds(train_step, args.iters, device))
        result["train_images_per_s"] = args.batch_size / step
        if device.type == "cuda":
            result["train_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        model.requires_grad_(False)
    model.eval()
    count = args.tpt_batch_size if name == "TPT" else args.eval_batch_size
    images = torch.randn(count, 3, size, size, device=device)
    grad = name == "TPT"  # test-time tuning takes gradient steps

    def eval_step() -> None:
        with torch.set_grad_enabled(grad), autocast:
            model.class_logits(images, classnames, templates)

    seconds(eval_step, args.warmup, device)
    result["eval_flops_per_image"] = flops_of(eval_step) / count
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result["eval_images_per_s"] = count / statistics.median(seconds(eval_step, args.iters, device))
    if device.type == "cuda":
        result["eval_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return result


def reference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Plain open_clip: encode_image in eval (no grad) and a full image-tower training step."""
    arch = args.arch
    if arch == "clipadapt-tiny":  # the bundled config is registered by clipadapt's backbone module
        from clipadapt.models import CLIPBackbone

        model = CLIPBackbone(arch, None).model.to(device)
    else:
        model = open_clip.create_model(arch, pretrained=None, device=device)
    size = model.visual.image_size[0]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    images = torch.randn(args.eval_batch_size, 3, size, size, device=device)
    model.eval()

    def encode() -> None:
        with torch.no_grad(), autocast:
            model.encode_image(images)

    seconds(encode, args.warmup, device)
    out = {"eval_images_per_s": args.eval_batch_size / statistics.median(seconds(encode, args.iters, device))}
    out["eval_flops_per_image"] = flops_of(encode) / args.eval_batch_size
    optimizer = torch.optim.AdamW(model.visual.parameters(), lr=1e-5)
    batch = torch.randn(args.batch_size, 3, size, size, device=device)
    model.train()

    def train_step() -> None:
        with autocast:
            loss = model.encode_image(batch).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds(train_step, args.warmup, device)
    out["train_images_per_s"] = args.batch_size / statistics.median(seconds(train_step, args.iters, device))
    out["train_flops_per_image"] = flops_of(train_step) / args.batch_size
    return out


def compile_check(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Eager vs compiled image-tower evaluation images/s (compile's first call timed apart), the same weights."""
    from clipadapt.models import CLIPBackbone

    eager = CLIPBackbone(args.arch, None).to(device).eval()
    compiled = CLIPBackbone(args.arch, None, compile=args.compile).to(device).eval()
    compiled.model = eager.model
    size = eager.image_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")
    images = torch.randn(args.eval_batch_size, 3, size, size, device=device)

    def encode(clip: CLIPBackbone) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), autocast:
                return clip.encode_image(images)

        return run

    out: dict[str, Any] = {"mode": args.compile, "first_call_s": seconds(encode(compiled), 1, device)[0]}
    seconds(encode(eager), args.warmup, device)
    seconds(encode(compiled), args.warmup, device)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.iters):  # interleaved: the same load for both
        for name, clip in (("eager", eager), ("compiled", compiled)):
            times[name] += seconds(encode(clip), 1, device)
    for name, ts in times.items():
        out[f"{name}_eval_images_per_s"] = args.eval_batch_size / statistics.median(ts)
    out["speedup"] = out["compiled_eval_images_per_s"] / out["eager_eval_images_per_s"]
    out["max_abs_diff"] = (encode(compiled)().float() - encode(eager)().float()).abs().max().item()
    return out


def add_mfu(line: dict[str, Any], peak: float | None) -> None:
    for kind in ("train", "eval"):
        if peak and f"{kind}_images_per_s" in line:
            line[f"{kind}_mfu"] = line[f"{kind}_images_per_s"] * line[f"{kind}_flops_per_image"] / (peak * 1e12)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default="bf16-mixed")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--tpt-batch-size", type=int, default=4, help="images per TPT evaluation step")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: known GPUs)")
    parser.add_argument("--methods", nargs="*", default=sorted(METHODS), choices=sorted(METHODS), help="none: skip")
    parser.add_argument("--compile", default=None, help="also time the image tower compiled in this mode vs eager")
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    peak = peak_tflops(device, args.peak_tflops)
    report: dict[str, Any] = {
        "machine": describe(device),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"peak_tflops": peak},
        "reference_open_clip": reference(args, device),
        "methods": {},
    }
    add_mfu(report["reference_open_clip"], peak)
    print(report["machine"], file=sys.stderr)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if args.compile:
        report["compile"] = compile_check(args, device)
        print(f"compile: {report['compile']}", file=sys.stderr)
        Path(args.out).write_text(json.dumps(report, indent=1))
    for name in args.methods:
        try:
            line = measure(name, args, device)
        except Exception as err:  # noqa: BLE001 - one method's failure must not cost the others' numbers
            line = {"error": f"{type(err).__name__}: {err}"[:500]}
        add_mfu(line, peak)
        report["methods"][name] = line
        shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items())
        print(f"{name}: {shown}", file=sys.stderr)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(report, indent=1))  # after every method: a timeout keeps what ran
    return report


if __name__ == "__main__":
    main()
