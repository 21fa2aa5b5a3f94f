"""Benchmark: class-prompt encoding with the full 77-token context vs cut after the last EOT.

    python -m benchmarks.text_encoder                      # 1000 classes, ViT-B-16 text tower, cuda if present
    python -m benchmarks.text_encoder --classes 100 --names words --repeats 5

Random weights are enough (`pretrained=None`): the cost does not depend on the values.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from clipadapt.models import CLIPBackbone

WORDS = ["golden", "retriever", "yellow-bellied", "sapsucker", "boeing", "737-800", "sea", "turtle", "lawn", "mower"]


def classnames(count: int, kind: str) -> list[str]:
    """`count` class names: "class 17" style, or 1-3 words of varied length like real datasets."""
    if kind == "numbered":
        return [f"class {i}" for i in range(count)]
    return [" ".join(WORDS[(i + k * 3) % len(WORDS)] for k in range(1 + i % 3)) for i in range(count)]


def encode(backbone: CLIPBackbone, tokens: Tensor, chunk_size: int, truncate: bool) -> Tensor:
    """(C, 77) tokens -> (C, D) unit features, chunk by chunk."""
    device = backbone.model.positional_embedding.device
    return torch.cat([backbone.encode_text(c.to(device), truncate=truncate) for c in tokens.split(chunk_size)])


def timed(fn: Callable[[], Tensor], device: torch.device) -> tuple[float, Tensor]:
    """Wall-clock seconds of one call (synchronising the GPU around it) and its result."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16-quickgelu")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--names", choices=["numbered", "words"], default="numbered")
    parser.add_argument("--template", default="a photo of a {}.")
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=None, help="default: 3 on GPU, 1 on CPU")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (3 if device.type == "cuda" else 1)  # a CPU full pass takes about a minute
    backbone = CLIPBackbone(args.arch, pretrained=None).to(device).eval()
    tokens = backbone.tokenize([args.template.format(name) for name in classnames(args.classes, args.names)])
    length = backbone._pooled_length(tokens)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; arch {args.arch}; {args.classes} prompts like {args.template.format('...')!r}")
    print(f"context: 77 tokens full, {length} after the last EOT; chunk {args.chunk_size}; {repeats} repeats")

    full, cut = [], []
    with torch.no_grad():
        warm = tokens[: args.chunk_size]
        encode(backbone, warm, args.chunk_size, truncate=False)
        encode(backbone, warm, args.chunk_size, truncate=True)
        for _ in range(repeats):  # interleaved, so drifting background load hits both alike
            seconds, full_features = timed(lambda: encode(backbone, tokens, args.chunk_size, truncate=False), device)
            full.append(seconds)
            seconds, cut_features = timed(lambda: encode(backbone, tokens, args.chunk_size, truncate=True), device)
            cut.append(seconds)
    diff = (full_features - cut_features).abs().max().item()

    full_s, cut_s = statistics.median(full), statistics.median(cut)
    print(f"full 77 tokens : {full_s:8.3f} s (median of {[round(t, 3) for t in full]})")
    print(f"EOT-truncated  : {cut_s:8.3f} s (median of {[round(t, 3) for t in cut]})")
    print(f"speed-up       : {full_s / cut_s:8.2f}x")
    print(f"max |diff|     : {diff:.2e} (unit-norm features)")


if __name__ == "__main__":
    main()
