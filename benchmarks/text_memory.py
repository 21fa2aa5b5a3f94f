"""Benchmark: peak memory and time of one training step's text side, with and without `text_chunk`.

    python benchmarks/text_memory.py                                  # clipadapt-tiny, 1000 classes
    python benchmarks/text_memory.py --arch ViT-B-16 --classes 1000 --precision bf16 --chunk 200

One step of a method that trains the text side at C classes: the (C, D) class embeddings (CoOp: the
learned context through `encode_text_embeddings`; CLIP-AST: every text block trainable through
`encode_text`), logits against a batch of frozen image features, cross-entropy, backward. Each variant
runs in a fresh subprocess; on CPU the peak is the process's peak RSS (ru_maxrss) minus its RSS after
the model is built, on CUDA torch.cuda.max_memory_allocated minus the allocation after the build.
Prints each method's peak and time unchunked and chunked, their ratios and the largest gradient difference.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from machine import describe


def step(args: argparse.Namespace) -> dict:
    from clipadapt.methods import CLIPAST, CoOp

    torch.manual_seed(0)
    classes = [f"class number {i}" for i in range(args.classes)]
    cls = {"coop": CoOp, "ast": CLIPAST}[args.method]
    model = cls(classes, ["a photo of a {}."], arch=args.arch, pretrained=None, prompts="simple",
                text_chunk=args.text_chunk).to(args.device)  # fmt: skip
    params = model._apply_stage(model.stages[0].name)
    if args.method == "ast":  # CLIP-AST's text units: every text block trains
        params = [p for _, p in model.clip.text_parameters()]
        for p in params:
            p.requires_grad_(True)
    model.train()
    features = torch.nn.functional.normalize(torch.randn(args.batch, model.clip.embed_dim), dim=-1).to(args.device)
    labels = torch.randint(0, args.classes, (args.batch,), device=args.device)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() / 1024  # RSS, KiB
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    start = time.perf_counter()
    with torch.autocast(args.device, dtype=dtype, enabled=args.precision == "bf16"):
        text = model.class_embeddings(classes, ["a photo of a {}."])  # (C, D)
        logits = 100 * features @ text.float().T
        torch.nn.functional.cross_entropy(logits, labels).backward()
    if cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    grads = torch.cat([p.grad.float().flatten() for p in params if p.grad is not None])
    return {
        "seconds": time.perf_counter() - start,
        "peak_mib": peak,
        "grads": grads[:: max(1, len(grads) // 4096)].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="clipadapt-tiny")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=100, help="text_chunk of the chunked variant")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--methods", nargs="+", default=["coop", "ast"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--text-chunk", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:  # one variant, in this fresh process
        print(json.dumps(step(args)))
        return
    print(describe(args.device))
    print(f"{args.arch}, {args.classes} classes, image batch {args.batch}, {args.precision}, text_chunk {args.chunk}")
    for method in args.methods:
        runs = {}
        for chunk in (0, args.chunk):
            cmd = [sys.executable, __file__, "--method", method, "--text-chunk", str(chunk), "--arch", args.arch,
                   "--classes", str(args.classes), "--batch", str(args.batch), "--precision", args.precision,
                   "--device", args.device]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            runs[chunk] = json.loads(out.strip().splitlines()[-1])
        one, chunked = runs[0], runs[args.chunk]
        diff = max(abs(a - b) for a, b in zip(one["grads"], chunked["grads"], strict=True))
        print(f"  {method:5s} one pass: {one['peak_mib']:8.0f} MiB {one['seconds']:7.2f} s   "
              f"chunked: {chunked['peak_mib']:8.0f} MiB {chunked['seconds']:7.2f} s   "
              f"memory {chunked['peak_mib'] / max(one['peak_mib'], 1e-9):.2f}x  time {chunked['seconds'] / one['seconds']:.2f}x  "
              f"max |grad difference| {diff:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
