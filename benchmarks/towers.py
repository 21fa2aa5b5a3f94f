"""Benchmark: the image and text towers — clipadapt's encoders vs open_clip's vs OpenAI's layout, one run.

    python benchmarks/towers.py                              # ViT-B-16, batch 8 images / 100 prompts, CPU
    python benchmarks/towers.py --arch ViT-B-16 --batch 8 --repeats 5 --device cuda

Random init weights (the cost does not depend on the values). Four image paths on the same weights:
`CLIPBackbone.encode_image` (clipadapt, `attention="module"` and `"sdpa"`), `model.encode_image` (open_clip's own forward), and a small
re-implementation of OpenAI's `clip` VisionTransformer layout (sequence-first (L, N, W) tensors through
`nn.MultiheadAttention(batch_first=False)`, the module OpenAI's ResidualAttentionBlock uses). The
text line compares clipadapt's EOT-truncated `encode_text` with open_clip's. Timings are interleaved
(A B C, A B C, ...) and the median is printed, with the max difference of the outputs against open_clip.
"""

import argparse
import statistics

import torch
from machine import describe, seconds
from torch import Tensor, nn

from clipadapt.models import CLIPBackbone


class OpenAIBlock(nn.Module):
    """OpenAI's ResidualAttentionBlock: seq-first (L, N, W), nn.MultiheadAttention, the same weights."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        width, heads = block.attn.embed_dim, block.attn.num_heads
        self.attn = nn.MultiheadAttention(width, heads)  # batch_first=False, as in OpenAI's clip
        self.attn.load_state_dict(block.attn.state_dict())
        self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class OpenAIVisual(nn.Module):
    """OpenAI's VisionTransformer.forward on open_clip's weights: permute to (L, N, W) once, blocks, back."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual
        self.blocks = nn.ModuleList(OpenAIBlock(b) for b in visual.transformer.resblocks)

    def forward(self, images: Tensor) -> Tensor:
        v = self.visual
        x = v.conv1(images).flatten(2).permute(0, 2, 1)  # (N, L, W)
        cls = v.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(x).permute(1, 0, 2)  # (L, N, W)
        for block in self.blocks:
            x = block(x)
        x = v.ln_post(x.permute(1, 0, 2)[:, 0, :])
        return x @ v.proj


def interleaved(fns: dict[str, object], repeats: int, device: torch.device) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += seconds(fn, 1, device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--prompts", type=int, default=100, help="prompts per text forward")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train", type=int, default=0, help="also time forward + backward at this batch (<= --batch)")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(describe(device))
    torch.manual_seed(0)
    backbone = CLIPBackbone(args.arch, None).to(device).eval()
    model = backbone.model
    fused = CLIPBackbone(args.arch, None, attention="sdpa").to(device).eval()
    fused.model = model  # the same weights
    openai = OpenAIVisual(model.visual).to(device).eval()
    size = backbone.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokens = backbone.tokenize([f"a photo of a class number {i}." for i in range(args.prompts)]).to(device)
    with torch.no_grad():
        reference = model.encode_image(images)
        diffs = {
            "clipadapt": (backbone.encode_image(images, normalize=False) - reference).abs().max().item(),
            "clipadapt sdpa": (fused.encode_image(images, normalize=False) - reference).abs().max().item(),
            "openai layout": (openai(images) - reference).abs().max().item(),
        }
        image = {"clipadapt": lambda: backbone.encode_image(images, normalize=False),
                 "clipadapt sdpa": lambda: fused.encode_image(images, normalize=False),
                 "open_clip": lambda: model.encode_image(images), "openai layout": lambda: openai(images)}  # fmt: skip
        for fn in image.values():
            fn()  # warm-up
        timed = interleaved(image, args.repeats, device)
        text = {"clipadapt": lambda: backbone.encode_text(tokens, normalize=False),
                "clipadapt sdpa": lambda: fused.encode_text(tokens, normalize=False),
                "open_clip": lambda: model.encode_text(tokens)}  # fmt: skip
        for fn in text.values():
            fn()
        text_timed = interleaved(text, args.repeats, device)
    fastest_other = min(timed["open_clip"], timed["openai layout"])
    print(f"{args.arch} encode_image, batch {args.batch} (median of {args.repeats}):")
    for name, s in timed.items():
        diff = f"  max |diff| vs open_clip {diffs[name]:.1e}" if name in diffs else ""
        print(f"  {name:14s} {s:7.3f} s  {args.batch / s:8.1f} images/s{diff}")
    for name in ("clipadapt", "clipadapt sdpa"):
        print(f"  {name} / fastest of open_clip and OpenAI's layout = {fastest_other / timed[name]:.2f}x")
    print(f"{args.arch} encode_text, {args.prompts} prompts:")
    for name, s in text_timed.items():
        print(f"  {name:14s} {s:7.3f} s  {args.prompts / s:8.1f} prompts/s")
    for name in ("clipadapt", "clipadapt sdpa"):
        print(f"  {name} / open_clip = {text_timed['open_clip'] / text_timed[name]:.2f}x")
    if args.train:  # forward + backward through the whole image tower (full fine-tuning's cost)
        model.requires_grad_(True)
        batch = images[: args.train]

        def step(backbone: CLIPBackbone) -> None:
            backbone.encode_image(batch).square().sum().backward()
            model.zero_grad(set_to_none=True)

        train = interleaved({"clipadapt": lambda: step(backbone), "clipadapt sdpa": lambda: step(fused),
                             "open_clip": lambda: model.encode_image(batch).square().sum().backward()}, args.repeats,
                            device)  # fmt: skip
        print(f"{args.arch} image tower forward + backward, batch {args.train}:")
        for name, s in train.items():
            print(f"  {name:14s} {s:7.3f} s  {args.train / s:8.1f} images/s")
        print(f"  clipadapt sdpa / clipadapt = {train['clipadapt'] / train['clipadapt sdpa']:.2f}x")


if __name__ == "__main__":
    main()
