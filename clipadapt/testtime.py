"""Test-time views and confidence selection shared by RAda-TTT and TPT, as pure functions.

TPT's recipe (Shu et al., "Test-Time Prompt Tuning for Zero-Shot Generalization in Vision-Language
Models", NeurIPS 2022, arXiv 2209.07511; public code azshue/TPT `data/datautils.py`,
`tpt_classification.py`): per test image the original view plus V−1 augmented views, of which the
⌊ρV⌋ with the lowest prediction entropy are kept (confidence selection).

Deliberate deviations (shared by both methods):
- Views are drawn on device from the test-transformed image (resize + center crop, normalized), not
  from the raw file: RandomResizedCrop(scale (0.08, 1), ratio (3/4, 4/3)) + flip, bilinear, via
  roi_align (box edges sample the neighbouring pixels instead of clamping to the crop).
- Each image's views are seeded from a hash of its pixels and a seed, not a global RNG, so a
  prediction does not depend on the order or batching of the test set (identical images share views).
- AugMix (TPT's views for the fine-grained sets; Hendrycks et al., ICLR 2020, the public code's
  `augmix_ops.py` at severity 1) runs on float tensors: the crop's pixels are not quantized to uint8
  except inside equalize and posterize, the affine ops (rotate, shear, translate) sample bilinearly
  at pixel centres, black where a pixel maps outside, as PIL does, and translations scale with the image size (the
  public code's up-to-7 px are of a 224 px image).
"""

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from clipadapt.data.datamodule import CLIP_MEAN, CLIP_STD
from clipadapt.losses import entropy

AUGMENTS = ("crop", "augmix")


def image_generator(image: Tensor, seed: int | str) -> torch.Generator:
    """A CPU generator seeded by `seed` and the pixels of one (3, H, W) image."""
    key = hashlib.blake2b(str(seed).encode(), digest_size=7)
    key.update(image.detach().float().cpu().numpy().tobytes())
    return torch.Generator().manual_seed(int.from_bytes(key.digest(), "little"))


def random_resized_crop_box(height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (scale (0.08, 1), ratio (3/4, 4/3)) from `generator`: top, left, h, w."""
    area = height * width
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * (0.08 + 0.92 * torch.rand((), generator=generator).item())
        ratio = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * torch.rand((), generator=generator).item())
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    side = min(height, width)  # torchvision's fallback: a center crop
    return (height - side) // 2, (width - side) // 2, side, side


def crop_views(images: Tensor, views: int, seed: int) -> Tensor:
    """(N, 3, H, W) -> (N, V, 3, H, W): view 0 the image itself, then V−1 random resized crops + flips."""
    size, count = images.shape[-1], views - 1
    boxes, flips = [], []
    for n, image in enumerate(images):
        generator = image_generator(image, seed)
        for _ in range(count):
            top, left, h, w = random_resized_crop_box(size, size, generator)
            boxes.append([n, left, top, left + w, top + h])
            flips.append(bool(torch.rand((), generator=generator) < 0.5))
    if not boxes:
        return images[:, None]
    boxes_t = torch.tensor(boxes, dtype=images.dtype, device=images.device)  # (N·(V−1), 5)
    crops = roi_align(images, boxes_t, size, sampling_ratio=1, aligned=True)  # (N·(V−1), 3, H, W)
    flip = torch.tensor(flips, device=images.device)[:, None, None, None]
    crops = torch.where(flip, crops.flip(-1), crops).unflatten(0, (len(images), count))
    return torch.cat([images[:, None], crops], 1)  # (N, V, 3, H, W), view 0 = original


def confident_views(logits: Tensor, share: float) -> Tensor:
    """Indices of the ⌊share·V⌋ (at least 1) lowest-entropy views: (..., V, C) -> (..., k) (TPT)."""
    keep = max(1, int(logits.shape[-2] * share))
    return entropy(logits).argsort(dim=-1, stable=True)[..., :keep]


def augmented_views(images: Tensor, views: int, seed: int, augment: str = "crop") -> Tensor:
    """(N, 3, H, W) normalized test images -> (N, V, 3, H, W) views, view 0 the image: `crop` or `augmix`."""
    if augment not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    crops = crop_views(images, views, seed)
    if augment == "crop" or views < 2:
        return crops
    mean = torch.tensor(CLIP_MEAN, device=images.device)[:, None, None]
    std = torch.tensor(CLIP_STD, device=images.device)[:, None, None]
    mixed = []
    for image, crop in zip(images, crops[:, 1:], strict=True):  # one image at a time: 3 chains per view
        pixels = (crop.float() * std + mean).clamp(0, 1)  # (V−1, 3, H, W) in [0, 1]
        mixed.append((augmix(pixels, image_generator(image, f"{seed}/augmix")) - mean) / std)
    return torch.cat([images[:, None], torch.stack(mixed).to(images.dtype)], 1)


# ---- AugMix at severity 1 (TPT's `augmix`: three chains of 1-3 ops, Dirichlet(1) mix, Beta(1, 1) skip) ----

POINT_OPS = ("autocontrast", "equalize", "posterize", "solarize")
AFFINE_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
AUGMIX_OPS = POINT_OPS + AFFINE_OPS  # the public code's `augmentations` list


def augmix(pixels: Tensor, generator: torch.Generator) -> Tensor:
    """(B, 3, H, W) images in [0, 1] -> AugMix of each: m·x + (1 − m)·Σ_i w_i chain_i(x), w ~ Dir(1, 1, 1), m ~ U(0, 1)."""
    count = len(pixels)

    def uniform(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator).to(pixels.device)

    weights = -torch.log1p(-uniform(count, 3))  # Exp(1) draws, normalized below: Dirichlet(1, 1, 1)
    weights = weights / weights.sum(1, keepdim=True)  # (B, 3)
    skip = uniform(count, 1, 1, 1)  # m ~ Beta(1, 1)
    depth = torch.randint(1, 4, (count, 3), generator=generator)  # ops per chain
    ops = torch.randint(0, len(AUGMIX_OPS), (count, 3, 3), generator=generator)  # (B, chain, step)
    ops = torch.where(torch.arange(3) < depth[..., None], ops, -1).flatten(0, 1).to(pixels.device)  # (3B, 3)
    levels = 0.1 + 0.9 * uniform(count * 3, 3)  # sample_level(severity 1) = U(0.1, 1)
    signs = torch.where(uniform(count * 3, 3) < 0.5, 1.0, -1.0)
    chains = pixels.repeat_interleave(3, 0)  # (3B, 3, H, W): chain i of image b at row 3b + i
    for step in range(3):
        chains = augmix_step(chains, ops[:, step], levels[:, step], signs[:, step])
    mix = (weights.view(count, 3, 1, 1, 1) * chains.unflatten(0, (count, 3))).sum(1)  # (B, 3, H, W)
    return skip * pixels + (1 - skip) * mix


def augmix_step(x: Tensor, ops: Tensor, levels: Tensor, signs: Tensor) -> Tensor:
    """Apply op `ops[r]` (an index into AUGMIX_OPS; −1: none) to image r of (R, 3, H, W) in [0, 1]."""
    x = x.clone()
    for k, name in enumerate(POINT_OPS):
        rows = (ops == k).nonzero().flatten()
        if len(rows):
            x[rows] = point_op(name, x[rows], levels[rows])
    rows = (ops >= len(POINT_OPS)).nonzero().flatten()
    if len(rows):
        x[rows] = affine_ops(x[rows], ops[rows] - len(POINT_OPS), levels[rows], signs[rows])
    return x


def point_op(name: str, x: Tensor, levels: Tensor) -> Tensor:
    """PIL's autocontrast / equalize / posterize(4 bits) / solarize at severity 1 on (R, 3, H, W) in [0, 1]."""
    if name == "autocontrast":  # per channel: the darkest value to 0, the brightest to 1
        low, high = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
        return torch.where(high > low, (x - low) / (high - low).clamp_min(1e-12), x)
    if name == "solarize":  # invert values at or above 256 − int(25.6·level) of 255
        threshold = (256 - (levels * 25.6).floor()).view(-1, 1, 1, 1) / 255
        return torch.where(x >= threshold, 1 - x, x)
    q = (x * 255).round().long()  # (R, 3, H, W) uint8 levels
    if name == "posterize":  # 4 - int(level·4/10) = 4 bits at severity 1
        return (q & 0xF0).float() / 255
    # equalize, as Pillow: per channel, lut[i] = (step // 2 + #pixels below i) // step, step = (n − n_last) // 256
    flat = q.flatten(2)  # (R, 3, HW)
    hist = torch.zeros(*flat.shape[:2], 256, dtype=torch.long, device=x.device).scatter_add_(
        2, flat, torch.ones_like(flat)
    )
    last = 255 - (hist.flip(-1) > 0).long().argmax(-1, keepdim=True)  # (R, 3, 1) brightest occupied level
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 256  # (R, 3, 1)
    below = hist.cumsum(-1) - hist  # (R, 3, 256)
    lut = torch.where(step > 0, (step // 2 + below) // step.clamp_min(1), torch.arange(256, device=x.device))
    return lut.clamp(max=255).gather(-1, flat).view_as(q).float() / 255


def affine_ops(x: Tensor, ops: Tensor, levels: Tensor, signs: Tensor) -> Tensor:
    """PIL's rotate / shear / translate (`ops[r]` an index into AFFINE_OPS) at severity 1 on (R, 3, H, W)."""
    rows, _, height, width = x.shape
    rotate, shear_x, shear_y, translate_x, translate_y = (ops == k for k in range(len(AFFINE_OPS)))  # (R,) each
    shear = signs * levels * 0.03  # level·0.3/10
    shift = signs * (levels * 224 / 3 / 10).floor() / 224  # int(level·(224/3)/10) px of a 224 px image
    zero = torch.zeros_like(levels)
    # PIL's inverse map, output pixel (x, y) -> input (a·x + b·y + c, d·x + e·y + f)
    a = e = torch.ones_like(levels)
    b, d = torch.where(shear_x, shear, zero), torch.where(shear_y, shear, zero)
    c, f = torch.where(translate_x, shift * width, zero), torch.where(translate_y, shift * height, zero)
    theta = torch.deg2rad(signs * (levels * 3).floor())  # int(level·30/10) degrees, counter-clockwise
    cos, sin, cx, cy = theta.cos(), theta.sin(), width / 2, height / 2  # about the centre
    a, b, d, e = (torch.where(rotate, r, v) for r, v in ((cos, a), (-sin, b), (sin, d), (cos, e)))
    c = torch.where(rotate, cx - cos * cx + sin * cy, c)
    f = torch.where(rotate, cy - sin * cx - cos * cy, f)
    matrices = torch.stack([a, b, c, d, e, f], 1).view(rows, 2, 3)  # (R, 2, 3)
    ys, xs = torch.meshgrid(torch.arange(height, device=x.device), torch.arange(width, device=x.device), indexing="ij")
    centres = torch.stack([xs, ys, torch.ones_like(xs)], -1).float() + torch.tensor([0.5, 0.5, 0.0], device=x.device)
    source = torch.einsum("rij,hwj->rhwi", matrices, centres)  # (R, H, W, 2) input pixel coordinates
    grid = 2 * source / torch.tensor([width, height], device=x.device) - 1  # align_corners=False convention
    inside = ((source >= 0) & (source < torch.tensor([width, height], device=x.device))).all(-1)  # (R, H, W)
    # PIL blends the edge pixels with their clamped neighbours and paints black only what maps outside.
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out * inside[:, None].to(out.dtype)
