"""The toy world: a vectorised torch renderer of 32 px scenes, their captions, and shifted domains.

A scene is one object on a background. The object has three attributes: a kind (8 shapes drawn from
implicit masks in the object's own frame), a colour (8) and a pattern (solid, striped, dotted,
checkered); position, size, rotation, background tone, colour jitter and pixel noise are nuisances.
Captions describe a scene through many templates (word orders, extra words, lead-ins, with or without
the pattern, the size, the position and the background).

Classes are (colour, kind) pairs. A quarter of the 64 pairs are held out of pretraining
(`HELD_OUT`: every kind and every colour is still seen with other partners). The 32 classes of the
toy datasets are 16 pairs seen in pretraining followed by 16 held-out pairs, so CoOp's base/novel
rule (first half / second half of the labels) makes "novel" mean "a combination never seen".

Domains: `toy` is the pretraining distribution; `toy_dusk` (dark, blue-tinted, low contrast),
`toy_blur` (blur and heavy noise) and `toy_palette` (a hue rotation) are class-agnostic shifts;
`toy_habitat` is class-specific: every class has its own saturated, textured background and a
smaller object, as real datasets have class-specific contexts. `write_toy` writes a domain to disk
in the CoOp layout (split json + PNGs) for the ordinary readers.

Everything is a function of a `torch.Generator`: the same seed gives the same images bit for bit.
"""

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

__all__ = [
    "CLASSES",
    "COLOURS",
    "DOMAINS",
    "HELD_OUT",
    "IMAGE_SIZE",
    "KINDS",
    "PATTERNS",
    "Scenes",
    "captions",
    "class_images",
    "classnames",
    "render",
    "sample_pretraining",
    "write_toy",
]

IMAGE_SIZE = 32
SUPERSAMPLE = 2  # drawn at 64 px and averaged down: anti-aliased edges and patterns

KINDS = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "heart")
COLOURS = {
    "red": (0.86, 0.12, 0.12),
    "orange": (0.95, 0.52, 0.08),
    "yellow": (0.93, 0.88, 0.12),
    "green": (0.15, 0.70, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "pink": (0.97, 0.50, 0.75),
}
COLOUR_NAMES = tuple(COLOURS)
PATTERNS = ("solid", "striped", "dotted", "checkered")
_PATTERN_WORDS = {
    "solid": ("solid", "plain"),
    "striped": ("striped",),
    "dotted": ("dotted", "spotted"),
    "checkered": ("checkered", "checked"),
}
_PATTERN_NOUNS = {"solid": "no pattern", "striped": "stripes", "dotted": "dots", "checkered": "checks"}

# (kind, colour) index pairs: held out of pretraining, and the seen pairs that are the base classes.
HELD_OUT = frozenset((k, c) for k in range(len(KINDS)) for c in range(len(COLOURS)) if (k - c) % 4 == 0)
BASE = tuple(
    sorted(
        ((k, c) for k in range(len(KINDS)) for c in range(len(COLOURS)) if (k - c) % 4 == 2), key=lambda p: (p[1], p[0])
    )
)
NOVEL = tuple(sorted(HELD_OUT, key=lambda p: (p[1], p[0])))
CLASSES: tuple[tuple[int, int], ...] = BASE + NOVEL  # label -> (kind, colour): 16 seen, then 16 held out
SEEN = tuple(sorted(set((k, c) for k in range(len(KINDS)) for c in range(len(COLOURS))) - HELD_OUT))


def classnames() -> list[str]:
    """The toy datasets' class names by label: `colour kind`, base (seen in pretraining) first."""
    return [f"{COLOUR_NAMES[c]} {KINDS[k]}" for k, c in CLASSES]


@dataclass(frozen=True)
class Shift:
    """How a domain changes a pretraining-like scene (all off: the pretraining distribution)."""

    gain: float = 1.0  # brightness multiplier
    gamma: float = 1.0
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)  # added after the gain
    blur: float = 0.0  # Gaussian sigma in pixels
    noise: float = 0.02  # pixel noise std
    hue: float = 0.0  # rotation about the grey axis, degrees
    habitat: bool = False  # class-specific backgrounds and smaller objects


DOMAINS: dict[str, Shift] = {
    "toy": Shift(),
    "toy_dusk": Shift(gain=0.38, gamma=1.5, tint=(0.02, 0.04, 0.12), noise=0.03),
    "toy_blur": Shift(blur=1.3, noise=0.12),
    "toy_palette": Shift(hue=30.0),
    "toy_habitat": Shift(habitat=True),
}


@dataclass
class Scenes:
    """Attributes and nuisances of a batch of scenes; every field has one row per scene."""

    kind: Tensor  # (B,) long
    colour: Tensor  # (B,) long
    pattern: Tensor  # (B,) long
    centre: Tensor  # (B, 2) pixels (x, y)
    radius: Tensor  # (B,) pixels
    angle: Tensor  # (B,) radians
    background: Tensor  # (B, 3) in [0, 1]
    jitter: Tensor  # (B, 3) colour multipliers
    phase: Tensor  # (B, 3) pattern offsets / orientation in [0, 1)

    def __len__(self) -> int:
        return self.kind.shape[0]


def _scenes(kind: Tensor, colour: Tensor, g: torch.Generator, small: bool = False) -> Scenes:
    n = kind.shape[0]
    u = torch.rand(n, 12, generator=g)
    lo, hi = (4.5, 7.5) if small else (6.0, 12.0)
    radius = lo + (hi - lo) * u[:, 0]
    centre = radius[:, None] + (IMAGE_SIZE - 2 * radius[:, None]) * u[:, 1:3]
    grey = 0.12 + 0.75 * u[:, 3:4]
    background = (grey + 0.10 * (u[:, 4:7] - 0.5)).clamp(0, 1)
    return Scenes(
        kind=kind,
        colour=colour,
        pattern=(u[:, 7] * len(PATTERNS)).long().clamp(max=len(PATTERNS) - 1),
        centre=centre,
        radius=radius,
        angle=(u[:, 8] - 0.5) * math.radians(50),
        background=background,
        jitter=1.0 + 0.16 * (u[:, 9:12] - 0.5),
        phase=torch.rand(n, 3, generator=g),
    )


def sample_pretraining(n: int, g: torch.Generator) -> Scenes:
    """`n` pretraining scenes: (kind, colour) uniform over the pairs not held out, nuisances at random."""
    seen = torch.tensor(SEEN)  # (48, 2)
    pick = seen[torch.randint(len(SEEN), (n,), generator=g)]
    return _scenes(pick[:, 0], pick[:, 1], g)


def _shape_masks(kind: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Inside-masks (B, S, S) in the object frame (unit radius) of each scene's kind."""
    r = torch.sqrt(x * x + y * y)
    theta = torch.atan2(y, x)

    def polygon(n: int, size: float) -> Tensor:
        sector = 2 * math.pi / n
        t = torch.remainder(theta + math.pi / 2, sector) - sector / 2  # a vertex points up (y grows downwards)
        return r * torch.cos(t) < size * math.cos(math.pi / n)  # inside the polygon of circumradius `size`

    masks = {
        0: r < 0.9,
        1: torch.maximum(x.abs(), y.abs()) < 0.75,
        2: polygon(3, 1.0),
        3: r < 0.42 + 0.5 * (0.5 + 0.5 * torch.cos(5 * (theta + math.pi / 2))) ** 2,
        4: ((x.abs() < 0.3) & (y.abs() < 0.92)) | ((y.abs() < 0.3) & (x.abs() < 0.92)),
        5: (r < 0.92) & (r > 0.5),
        6: (r < 0.9) & (torch.sqrt((x - 0.42) ** 2 + (y + 0.18) ** 2) > 0.72),
        7: ((1.25 * x) ** 2 + (-1.25 * y + 0.2) ** 2 - 1) ** 3 - (1.25 * x) ** 2 * (-1.25 * y + 0.2) ** 3 < 0,
    }
    out = torch.zeros_like(x, dtype=torch.bool)
    for k, mask in masks.items():
        rows = kind == k
        out[rows] = mask[rows]
    return out


def _pattern_masks(pattern: Tensor, phase: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """Dark-region masks (B, S, S) of each scene's pattern, in the object frame so they scale with it."""
    p0, p1, p2 = (phase[:, i, None, None] for i in range(3))
    angle = math.pi * p2
    along = x * torch.cos(angle) + y * torch.sin(angle)
    stripes = torch.sin(2 * math.pi * (along / 0.5 + p0)) > 0
    fx, fy = torch.remainder(x / 0.55 + p0, 1.0) - 0.5, torch.remainder(y / 0.55 + p1, 1.0) - 0.5
    dots = fx * fx + fy * fy < 0.3**2
    checks = (torch.floor(x / 0.5 + p0) + torch.floor(y / 0.5 + p1)).remainder(2) == 0
    out = torch.zeros_like(x, dtype=torch.bool)
    for index, mask in ((1, stripes), (2, dots), (3, checks)):
        rows = pattern == index
        out[rows] = mask[rows]
    return out


def _hue_matrix(degrees: float) -> Tensor:
    """Rotation by `degrees` about the grey axis (1, 1, 1)/sqrt(3) (Rodrigues), applied to RGB column vectors."""
    a = math.radians(degrees)
    k = torch.full((3,), 1 / math.sqrt(3))
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return torch.eye(3) * math.cos(a) + math.sin(a) * cross + (1 - math.cos(a)) * torch.outer(k, k)


def _blur(images: Tensor, sigma: float) -> Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    x = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _habitat_background(labels: Tensor, g: torch.Generator, s: int) -> Tensor:
    """(B, 3, S, S) class-specific backgrounds: a saturated colour other than the class's, with its own bands."""
    palette = torch.tensor(list(COLOURS.values()))  # (8, 3)
    pairs = torch.tensor(CLASSES)  # (32, 2)
    kind, colour = pairs[labels, 0], pairs[labels, 1]
    first = (colour + 1 + labels % 7) % len(COLOURS)  # never the class's own colour
    second = (first + 3 + kind % 3) % len(COLOURS)
    freq = 1.0 + (labels % 4).float()  # bands across the image
    angle = math.pi * (labels % 5).float() / 5
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    jitter = torch.rand(len(labels), generator=g)
    along = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
    band = (torch.sin(2 * math.pi * (freq[:, None, None] * along + jitter[:, None, None])) > 0).float()
    a, b = 0.75 * palette[first], 0.55 * palette[second]  # (B, 3)
    return a[:, :, None, None] * (1 - band[:, None]) + b[:, :, None, None] * band[:, None]


def render(scenes: Scenes, g: torch.Generator, shift: Shift = DOMAINS["toy"], labels: Tensor | None = None) -> Tensor:
    """(B, 3, 32, 32) images in [0, 1], quantised to 8 bits (as a PNG stores them)."""
    s = IMAGE_SIZE * SUPERSAMPLE
    n = len(scenes)
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / SUPERSAMPLE  # pixel units
    py, px = torch.meshgrid(coords, coords, indexing="ij")
    dx = (px[None] - scenes.centre[:, 0, None, None]) / scenes.radius[:, None, None]  # (B, S, S)
    dy = (py[None] - scenes.centre[:, 1, None, None]) / scenes.radius[:, None, None]
    cos, sin = torch.cos(scenes.angle)[:, None, None], torch.sin(scenes.angle)[:, None, None]
    x, y = cos * dx + sin * dy, -sin * dx + cos * dy  # object frame, rotated by -angle
    inside = _shape_masks(scenes.kind, x, y).float()[:, None]  # (B, 1, S, S)
    dark = _pattern_masks(scenes.pattern, scenes.phase, x, y).float()[:, None]
    palette = torch.tensor(list(COLOURS.values()))
    fill = (palette[scenes.colour] * scenes.jitter).clamp(0, 1)[:, :, None, None] * (1 - 0.6 * dark)  # (B, 3, S, S)
    if shift.habitat:
        if labels is None:
            raise ValueError("the habitat domain is class-specific: pass the labels")
        background = _habitat_background(labels, g, s)
    else:
        background = scenes.background[:, :, None, None].expand(n, 3, s, s)
    images = background * (1 - inside) + fill * inside
    images = F.avg_pool2d(images, SUPERSAMPLE)  # (B, 3, 32, 32)
    if shift.hue:
        images = torch.einsum("ij,bjhw->bihw", _hue_matrix(shift.hue), images)
    if shift.gain != 1.0 or shift.gamma != 1.0 or any(shift.tint):
        images = images.clamp(0, 1) ** shift.gamma * shift.gain + torch.tensor(shift.tint)[None, :, None, None]
    if shift.blur:
        images = _blur(images, shift.blur)
    images = images + shift.noise * torch.randn(images.shape, generator=g)
    return torch.round(images.clamp(0, 1) * 255) / 255


_TEMPLATES = (
    "a photo of a {c} {k}.",
    "a photo of a {c} {k}.",
    "a {c} {k}.",
    "{c} {k}",
    "a {p} {c} {k}.",
    "a photo of a {p} {c} {k}.",
    "a {k} that is {c}.",
    "a {c} {k} with {pn}.",
    "a {s} {c} {k}.",
    "a {c} {k} on a {bg} background.",
    "a picture of a {c} {k} in the {pos}.",
    "there is a {c} {k} in the image.",
    "an image of a {p} {k}, {c}.",
    "the {k} is {c} and {p}.",
    "a {s} {p} {c} {k} on a {bg} background.",
    "{c} {k}, {p}, {s}.",
    "a drawing of a {c} {k}.",
    "one {c} {k} in the {pos}.",
    "a {k} coloured {c}.",
    "this is a {c} {k}.",
    "a {p} {k} in {c}.",
    "a close-up photo of a {s} {c} {k}.",
)


def captions(scenes: Scenes, g: torch.Generator) -> list[str]:
    """One caption per scene, its template and synonyms drawn from `g`."""
    n = len(scenes)
    pick = torch.randint(len(_TEMPLATES), (n,), generator=g).tolist()
    synonym = torch.randint(2, (n,), generator=g).tolist()
    out = []
    for i in range(n):
        pattern = PATTERNS[int(scenes.pattern[i])]
        words = _PATTERN_WORDS[pattern]
        cx, cy = float(scenes.centre[i, 0]), float(scenes.centre[i, 1])
        if abs(cx - 16) < 4 and abs(cy - 16) < 4:
            pos = "centre"
        elif abs(cx - 16) > abs(cy - 16):
            pos = "left" if cx < 16 else "right"
        else:
            pos = "top" if cy < 16 else "bottom"
        out.append(
            _TEMPLATES[pick[i]].format(
                c=COLOUR_NAMES[int(scenes.colour[i])],
                k=KINDS[int(scenes.kind[i])],
                p=words[synonym[i] % len(words)],
                pn=_PATTERN_NOUNS[pattern],
                s="small" if float(scenes.radius[i]) < 9 else "large",
                pos=pos,
                bg="dark" if float(scenes.background[i].mean()) < 0.5 else "light",
            )
        )
    return out


def class_images(domain: str, labels: Tensor, g: torch.Generator) -> Tensor:
    """(B, 3, 32, 32) images of the toy classes `labels` (see `CLASSES`) in `domain`."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown toy domain {domain!r}; valid: {', '.join(DOMAINS)}")
    shift = DOMAINS[domain]
    pairs = torch.tensor(CLASSES)[labels]
    scenes = _scenes(pairs[:, 0], pairs[:, 1], g, small=shift.habitat)
    return render(scenes, g, shift, labels=labels)


MARKER = ".clipadapt_toy.json"


def write_toy(
    root: str | os.PathLike,
    domain: str = "toy",
    train_per_class: int = 32,
    val_per_class: int = 4,
    test_per_class: int = 25,
    seed: int = 0,
) -> Path:
    """Write `domain` under `root` in the CoOp layout (`<domain>/split_zhou_<Coop>.json`, PNGs); kept if written."""
    from clipadapt.data.readers import absolute_root, resolve_dataset
    from clipadapt.data.synthetic import write_once
    from clipadapt.errors import ClipAdaptError

    info = resolve_dataset(domain)
    if info.name not in DOMAINS:
        raise ValueError(f"{domain!r} is not a toy domain; valid: {', '.join(DOMAINS)}")
    params = {"domain": info.name, "train": train_per_class, "val": val_per_class, "test": test_per_class, "seed": seed}

    def fill(tmp: Path) -> None:
        names = classnames()
        splits: dict[str, list[list]] = {}
        for index, (split, per_class) in enumerate(
            (("train", train_per_class), ("val", val_per_class), ("test", test_per_class))
        ):
            g = torch.Generator().manual_seed(seed * 1000 + index)
            labels = torch.arange(len(CLASSES)).repeat_interleave(per_class)
            images = class_images(info.name, labels, g) if per_class else torch.zeros(0, 3, IMAGE_SIZE, IMAGE_SIZE)
            pixels = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            entries = []
            for i, label in enumerate(labels.tolist()):
                rel = f"{names[label].replace(' ', '_')}/{split}_{i:05d}.png"
                path = tmp / info.image_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(pixels[i]), "RGB").save(path, format="PNG")
                entries.append([rel, label, names[label]])
            splits[split] = entries
        (tmp / info.split_file).write_text(json.dumps(splits))

    return write_once(absolute_root(root), info.folder, params, MARKER, fill, "write_toy", ClipAdaptError)
