"""Benchmark: the image and text towers — clipadapt's encoders vs open_clip's vs OpenAI's layout, one run.

    python benchmarks/towers.py                              # ViT-B-16, batch 8 images / 100 prompts, CPU
    python benchmarks/towers.py --arch ViT-B-16 --batch 8 --repeats 5 --train 4 --device cuda

Random init weights (the cost does not depend on the values), the same weights on every path:
- `open_clip`: the model's own `encode_image` / `encode_text`;
- `openai layout`: a small re-implementation of OpenAI's `clip` towers (sequence-first (L, N, W) tensors
  through `nn.MultiheadAttention(batch_first=False)`, as OpenAI's ResidualAttentionBlock; the text tower
  on all 77 columns under the additive causal mask);
- `clipadapt module`: `CLIPBackbone(attention="module")`, open_clip's blocks (bit-exact);
- `clipadapt default`: `CLIPBackbone()` (`attention="sdpa"`): batch-first over SDPA, oneDNN projections on x86;
- `default, MKL GEMM` (image only): the default path with F.linear (MKL's sgemm on CPU) for its projections,
  which splits the default's gain into the GEMM backend and the rest.
clipadapt's text rows cut after the last EOT (its `encode_text` default); `default, 77 tokens` does the
same work as the references. Timings are interleaved (A B C, A B C, ...), each line the median of
--repeats, with the max |difference| of the outputs against open_clip's. Ratios are against the faster of
open_clip and OpenAI's layout in the same run; the machine and its load are printed before and after.
"""

import argparse
import statistics
from collections.abc import Callable

import torch
from machine import describe, seconds
from torch import Tensor, nn

import clipadapt.models.backbone as backbone_module
from clipadapt.models import CLIPBackbone

REFERENCES = ("open_clip", "openai layout")


class OpenAIBlock(nn.Module):
    """OpenAI's ResidualAttentionBlock: seq-first (L, N, W), nn.MultiheadAttention, the same weights."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        width, heads = block.attn.embed_dim, block.attn.num_heads
        self.attn = nn.MultiheadAttention(width, heads)  # batch_first=False, as in OpenAI's clip
        self.attn.load_state_dict(block.attn.state_dict())
        self.ln_1, self.ln_2, self.mlp = block.ln_1, block.ln_2, block.mlp

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
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


class OpenAIText(nn.Module):
    """OpenAI's CLIP.encode_text on open_clip's weights: (L, N, W) blocks under the additive causal mask, 77 columns."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.blocks = nn.ModuleList(OpenAIBlock(b) for b in model.transformer.resblocks)

    def forward(self, tokens: Tensor) -> Tensor:
        m = self.model
        x = (m.token_embedding(tokens) + m.positional_embedding).permute(1, 0, 2)  # (L, N, W)
        for block in self.blocks:
            x = block(x, attn_mask=m.attn_mask)
        x = m.ln_final(x.permute(1, 0, 2))  # (N, L, W)
        return x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)] @ m.text_projection


class MKLGemm:
    """The default path with F.linear for its projections (for the attribution line), while inside."""

    def __enter__(self) -> None:
        self.saved, backbone_module._ONEDNN = backbone_module._ONEDNN, False

    def __exit__(self, *exc: object) -> None:
        backbone_module._ONEDNN = self.saved


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per path, the paths timed in turn (A B C, A B C, ...) after one warm-up call each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name] += seconds(fn, 1, device)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(title: str, timed: dict[str, float], count: int, unit: str, diffs: dict[str, float] | None = None) -> None:
    """One line per path (seconds, rate, max |diff|), then each clipadapt path against the faster reference."""
    print(title)
    for name, s in timed.items():
        diff = f"  max |diff| vs open_clip {diffs[name]:.1e}" if diffs and name in diffs else ""
        print(f"  {name:19s} {s:7.3f} s  {count / s:8.1f} {unit}/s{diff}")
    fastest = min(timed[name] for name in REFERENCES if name in timed)
    for name, s in timed.items():
        if name not in REFERENCES:
            print(f"  {name} / faster of open_clip and OpenAI's layout = {fastest / s:.2f}x")


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
    default = CLIPBackbone(args.arch, None).to(device).eval()
    model = default.model
    module = CLIPBackbone(args.arch, None, attention="module").to(device).eval()
    module.model = model  # the same weights
    openai, openai_text = OpenAIVisual(model.visual).to(device).eval(), OpenAIText(model).to(device).eval()
    size = default.image_size
    images = torch.randn(args.batch, 3, size, size, device=device)
    tokens = default.tokenize([f"a photo of a class number {i}." for i in range(args.prompts)]).to(device)

    def default_mkl() -> Tensor:
        with MKLGemm():
            return default.encode_image(images, normalize=False)

    image = {
        "open_clip": lambda: model.encode_image(images),
        "openai layout": lambda: openai(images),
        "clipadapt module": lambda: module.encode_image(images, normalize=False),
        "clipadapt default": lambda: default.encode_image(images, normalize=False),
        "default, MKL GEMM": default_mkl,
    }
    text = {
        "open_clip": lambda: model.encode_text(tokens),
        "openai layout": lambda: openai_text(tokens),
        "clipadapt module": lambda: module.encode_text(tokens, normalize=False),
        "clipadapt default": lambda: default.encode_text(tokens, normalize=False),
        "default, 77 tokens": lambda: default.encode_text(tokens, normalize=False, truncate=False),
    }
    with torch.no_grad():
        image_diffs = {name: (fn() - image["open_clip"]()).abs().max().item() for name, fn in image.items()}
        text_diffs = {name: (fn() - text["open_clip"]()).abs().max().item() for name, fn in text.items()}
        image_timed = interleaved(image, args.repeats, device)
        text_timed = interleaved(text, args.repeats, device)
    report(f"{args.arch} encode_image, batch {args.batch}, no grad (median of {args.repeats}):", image_timed,
           args.batch, "images", image_diffs)  # fmt: skip
    report(f"{args.arch} encode_text, {args.prompts} prompts, no grad:", text_timed, args.prompts, "prompts",
           text_diffs)  # fmt: skip
    if args.train:  # forward + backward through the whole image tower (full fine-tuning's cost)
        model.requires_grad_(True)
        batch = images[: args.train]

        def step(encode: Callable[[Tensor], Tensor]) -> None:
            encode(batch).square().sum().backward()
            model.zero_grad(set_to_none=True)

        train = {
            "open_clip": lambda: step(model.encode_image),
            "openai layout": lambda: step(openai),
            "clipadapt module": lambda: step(lambda x: module.encode_image(x, normalize=False)),
            "clipadapt default": lambda: step(lambda x: default.encode_image(x, normalize=False)),
        }
        report(f"{args.arch} image tower forward + backward, batch {args.train}:",
               interleaved(train, args.repeats, device), args.train, "images")  # fmt: skip
    print(describe(device))


if __name__ == "__main__":
    main()
