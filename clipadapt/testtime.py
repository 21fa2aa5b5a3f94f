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
"""

import hashlib
import math

import torch
from torch import Tensor
from torchvision.ops import roi_align

from clipadapt.losses import entropy


def image_generator(image: Tensor, seed: int) -> torch.Generator:
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
