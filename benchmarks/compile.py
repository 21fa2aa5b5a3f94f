"""Benchmark: `compile` on vs off — first-call compile time and steady-state speed of the towers, one run.

    python benchmarks/compile.py                                   # ViT-B-16, batch 4 images / 100 prompts, CPU
    python benchmarks/compile.py --arch clipadapt-tiny --batch 32
    python benchmarks/compile.py --arch ViT-B-16 --batch 64 --device cuda  # bf16 autocast on CUDA

Random init weights (the cost does not depend on the values); the eager and the compiled backbone share
one model. Three paths: `encode_image` (no grad), `encode_text` (no grad, EOT-truncated; then a second
prompt set of another count and length, which shows whether a new evaluation set compiles again) and
one training step (forward + backward through both towers, CLIP's cross-entropy over the batch's
prompts, every parameter trainable, as in FT / CLIP-AST). For each: the compiled first call (compile
included; a fresh inductor cache unless --warm-cache), eager and compiled steady state timed
interleaved (median of --repeats), their ratio, and the max |difference| of the outputs (of the
gradients for the training step).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

if "--warm-cache" not in sys.argv:  # before torch reads it: a cold compile, as a user's first run
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-")

import torch
import torch.nn.functional as F
from machine import describe, seconds
from torch._dynamo.utils import counters

from clipadapt.models import CLIPBackbone


def first_call(fn, device: torch.device) -> float:
    return seconds(fn, 1, device)[0]


def interleaved(fns: dict[str, object], repeats: int, device: torch.device) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += seconds(fn, 1, device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=4, help="images per forward")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per text forward")
    parser.add_argument("--train", type=int, default=None, help="images per training step (default: --batch)")
    parser.add_argument("--train-prompts", type=int, default=10, help="prompts (classes) per training step")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--attention", default="sdpa", choices=["module", "sdpa"], help="the eager path (default: the library default)"
    )
    parser.add_argument("--mode", default="default", help="the compile mode timed against eager")
    parser.add_argument("--skip-train", action="store_true", help="time the no-grad encoders only")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (warm compiles)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(describe(device))
    torch.manual_seed(0)
    eager = CLIPBackbone(args.arch, None, attention=args.attention).to(device).eval()
    compiled = CLIPBackbone(args.arch, None, attention=args.attention, compile=args.mode).to(device).eval()
    compiled.model = eager.model  # the same weights
    size = eager.image_size
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"{args.arch}, attention {args.attention}, compile {args.mode!r} vs off, {device.type} {precision}")
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokens = eager.tokenize([f"a photo of a class number {i}." for i in range(args.prompts)]).to(device)
    other = eager.tokenize([f"a blurry close-up photo of the thing number {i}." for i in range(args.prompts // 2 + 3)])
    other = other.to(device)
    rows = []  # (what, items, first call s, eager s, compiled s, max |diff|)

    def measure(what: str, items: int, run, compare) -> None:
        graphs = counters["stats"]["unique_graphs"]
        first = first_call(lambda: run(compiled), device)
        run(eager)  # warm-up
        run(compiled)
        timed = interleaved({"eager": lambda: run(eager), "compiled": lambda: run(compiled)}, args.repeats, device)
        new = counters["stats"]["unique_graphs"] - graphs
        rows.append((what, items, first, timed["eager"], timed["compiled"], compare(), new))

    with torch.no_grad(), autocast:

        def image(clip):
            return clip.encode_image(images)

        def text(clip):
            return clip.encode_text(tokens)

        def text_other(clip):
            return clip.encode_text(other)

        def diff(fn):
            return lambda: (fn(compiled).float() - fn(eager).float()).abs().max().item()

        measure(f"encode_image, batch {args.batch}", args.batch, image, diff(image))
        measure(f"encode_text, {args.prompts} prompts", args.prompts, text, diff(text))
        measure(f"encode_text, another set ({len(other)})", len(other), text_other, diff(text_other))
    if not args.skip_train:
        count = args.train or args.batch
        batch = images[:count]
        labels = torch.arange(count, device=device) % args.train_prompts
        train_tokens = tokens[: args.train_prompts]
        eager.train().requires_grad_(True)
        compiled.train()
        params = list(eager.parameters())

        def step(clip):
            with autocast:
                logits = clip.logits(clip.encode_image(batch), clip.encode_text(train_tokens))  # (B, C)
                loss = F.cross_entropy(logits.float(), labels)
            loss.backward()

        def grads(clip):
            eager.model.zero_grad(set_to_none=True)
            step(clip)
            return [p.grad.detach().clone() for p in params]

        def grad_diff():
            a, b = grads(eager), grads(compiled)
            eager.model.zero_grad(set_to_none=True)
            return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b, strict=True))

        measure(f"train step fwd+bwd, batch {count}", count, step, grad_diff)
    print(f"{'path':34s} {'first call':>10s} {'eager':>9s} {'compiled':>9s} {'eager/s':>9s} {'compiled/s':>10s} "
          f"{'speedup':>7s} {'max |diff|':>10s} graphs")  # fmt: skip
    for what, items, first, e, c, d, new in rows:
        print(f"{what:34s} {first:9.2f}s {e:8.4f}s {c:8.4f}s {items / e:9.1f} {items / c:10.1f} {e / c:6.2f}x "
              f"{d:10.1e} {new:6d}")  # fmt: skip
    print(f"(median of {args.repeats}, interleaved; items/s are images/s, prompts/s for encode_text; "
          f"graphs: new compiled graphs of that path; {time.strftime('%Y-%m-%d %H:%M')})")  # fmt: skip


if __name__ == "__main__":
    main()
