"""Pretraining of the toy CLIP (`clipadapt-toy`) on the toy world, and its zero-shot evaluation.

    clipadapt pretrain-toy --out /tmp/toy              # the shipped run (its settings are the defaults)
    clipadapt pretrain-toy --check                     # retrain and compare with the shipped weights

Image-caption pairs are generated on the fly from one seed (`clipadapt.toy.world`: pairs never held
out), the loss is open_clip's `ClipLoss` (symmetric InfoNCE with the learned temperature), AdamW
with a linear warm-up and a cosine decay. Every `eval_every` steps the zero-shot accuracy on fixed
generated test sets of every domain is logged (the curve goes into the manifest). The result is a
safetensors state dict of the open_clip model and a manifest json (settings, sha256, zero-shot per
domain, curve).

Deterministic: the same settings and thread count on the same machine give the same bytes. Across
machines (another CPU, another torch build) float rounding may differ; `--check` then compares the
zero-shot accuracies with the shipped manifest's within `--tolerance` points. One thread by default:
the result then does not depend on the core count (and on a shared 2-core machine two threads ran 3x
slower than one).

The shipped files live in `clipadapt/models/pretrained/` (not `models/weights/`: `models/weights.py` is
a module) and are found by the bundled tag `toy` (`clipadapt.models.backbone.BUNDLED_TAGS`).
"""

import argparse
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from open_clip.loss import ClipLoss
from torch import Tensor

from clipadapt.toy import world

__all__ = ["SHIPPED_MANIFEST", "SHIPPED_WEIGHTS", "evaluate", "eval_set", "main", "pretrain"]

log = logging.getLogger(__name__)

ARCH = "clipadapt-toy"
SHIPPED_WEIGHTS = Path(__file__).resolve().parent.parent / "models" / "pretrained" / "clipadapt-toy.safetensors"
SHIPPED_MANIFEST = SHIPPED_WEIGHTS.with_suffix(".json")
EVAL_SEED = 2024  # the fixed zero-shot test sets: a different stream from any training seed
EVAL_PER_CLASS = 20
TEMPLATE = "a photo of a {}."
DEFAULTS: dict[str, Any] = {
    "steps": 1000,
    "batch_size": 256,
    "lr": 2e-3,
    "weight_decay": 0.1,
    "warmup": 100,
    "seed": 0,
    "threads": 1,
    "eval_every": 200,
}


def _normalize(images: Tensor) -> Tensor:
    from clipadapt.data.datamodule import CLIP_MEAN, CLIP_STD  # the datamodule's normalisation, so eval matches

    mean, std = torch.tensor(CLIP_MEAN)[None, :, None, None], torch.tensor(CLIP_STD)[None, :, None, None]
    return (images - mean) / std


def eval_set(domain: str, per_class: int = EVAL_PER_CLASS, seed: int = EVAL_SEED) -> tuple[Tensor, Tensor]:
    """The fixed zero-shot test set of `domain`: (N, 3, 32, 32) normalised images, (N,) labels of `world.CLASSES`."""
    g = torch.Generator().manual_seed(seed + list(world.DOMAINS).index(domain))
    labels = torch.arange(len(world.CLASSES)).repeat(per_class)
    return _normalize(world.class_images(domain, labels, g)), labels


@torch.no_grad()
def evaluate(backbone: Any, per_class: int = EVAL_PER_CLASS) -> dict[str, dict[str, float]]:
    """Zero-shot top-1 (%) per domain: `all` (32-way), `base` and `novel` (16-way each, as base-to-novel scores)."""
    was_training = backbone.training
    backbone.eval()
    text = backbone.encode_text(backbone.tokenize([TEMPLATE.format(n) for n in world.classnames()]))  # (C, D)
    half = len(world.CLASSES) // 2
    out = {}
    for domain in world.DOMAINS:
        images, labels = eval_set(domain, per_class)
        feats = torch.cat([backbone.encode_image(chunk) for chunk in images.split(500)])  # (N, D)
        logits = feats @ text.T  # (N, C)
        base, novel = labels < half, labels >= half
        out[domain] = {
            "all": 100.0 * (logits.argmax(1) == labels).float().mean().item(),
            "base": 100.0 * (logits[base, :half].argmax(1) == labels[base]).float().mean().item(),
            "novel": 100.0 * (logits[novel, half:].argmax(1) + half == labels[novel]).float().mean().item(),
        }
    backbone.train(was_training)
    return out


def _lr_at(step: int, steps: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def pretrain(
    out: str | Path,
    steps: int = DEFAULTS["steps"],
    batch_size: int = DEFAULTS["batch_size"],
    lr: float = DEFAULTS["lr"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup: int = DEFAULTS["warmup"],
    seed: int = DEFAULTS["seed"],
    threads: int = DEFAULTS["threads"],
    eval_every: int = DEFAULTS["eval_every"],
    out_partial: str | Path | None = None,
    eval_per_class: int = EVAL_PER_CLASS,
) -> dict[str, Any]:
    """Train the toy CLIP from scratch; write `clipadapt-toy.safetensors` and its manifest into `out`; return the manifest."""
    from safetensors.torch import save_file

    from clipadapt.models import CLIPBackbone

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    # open_clip's own blocks, as when the shipped weights were trained: the same seed gives the same file.
    backbone = CLIPBackbone(ARCH, pretrained=None, attention="module")
    decay = [p for n, p in backbone.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in backbone.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}], lr=lr
    )
    loss_fn = ClipLoss()
    g = torch.Generator().manual_seed(seed)
    token_cache: dict[str, Tensor] = {}
    curve = []
    start = time.time()
    backbone.train()
    for step in range(steps):
        scenes = world.sample_pretraining(batch_size, g)
        images = _normalize(world.render(scenes, g))
        texts = world.captions(scenes, g)
        missing = [t for t in dict.fromkeys(texts) if t not in token_cache]
        if missing:
            token_cache.update(zip(missing, backbone.tokenize(missing), strict=True))
        tokens = torch.stack([token_cache[t] for t in texts])  # (B, 77)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, warmup, lr)
        image_features = backbone.encode_image(images)
        text_features = backbone.encode_text(tokens)
        loss = loss_fn(image_features, text_features, backbone.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            backbone.logit_scale.clamp_(0, math.log(100))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            accuracy = evaluate(backbone, eval_per_class)
            curve.append(
                {
                    "step": step + 1,
                    "samples": (step + 1) * batch_size,
                    "loss": round(loss.item(), 4),
                    "seconds": round(time.time() - start, 1),
                    "zero_shot": {d: round(a["all"], 2) for d, a in accuracy.items()},
                }
            )
            log.info(
                "step %d loss %.4f zero-shot %s (%.0f s)",
                step + 1,
                loss.item(),
                curve[-1]["zero_shot"],
                curve[-1]["seconds"],
            )
            if out_partial is not None:  # a long run can be looked at before it ends
                Path(out_partial).mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().contiguous() for k, v in backbone.model.state_dict().items()}
                save_file(state, str(Path(out_partial) / f"step{step + 1}.safetensors"))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / SHIPPED_WEIGHTS.name
    state = {k: v.detach().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(weights), metadata={"arch": ARCH})
    manifest = {
        "arch": ARCH,
        "file": weights.name,
        "sha256": sha256(weights),
        "settings": {
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "weight_decay": weight_decay,
            "warmup": warmup,
            "seed": seed,
            "threads": threads,
            "eval_every": eval_every,
        },
        "samples": steps * batch_size,
        "seconds": round(time.time() - start, 1),
        "torch": torch.__version__,
        "eval": {"per_class": eval_per_class, "seed": EVAL_SEED, "template": TEMPLATE},
        "zero_shot": {d: {k: round(v, 2) for k, v in a.items()} for d, a in accuracy.items()},
        "curve": curve,
    }
    (out_dir / SHIPPED_MANIFEST.name).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compare(manifest: dict[str, Any], shipped: dict[str, Any], tolerance: float) -> list[str]:
    """Where `manifest`'s zero-shot accuracies differ from `shipped`'s by more than `tolerance` points."""
    problems = []
    for domain, scores in shipped["zero_shot"].items():
        for key, value in scores.items():
            got = manifest["zero_shot"].get(domain, {}).get(key)
            if got is None or abs(got - value) > tolerance:
                problems.append(f"{domain}/{key}: {got} vs shipped {value}")
    return problems


def main(argv: Sequence[str] | None = None) -> None:
    """`clipadapt pretrain-toy`: pretrain the toy CLIP, or `--check` the shipped weights by retraining them."""
    parser = argparse.ArgumentParser(prog="clipadapt pretrain-toy", description=main.__doc__)
    parser.add_argument("--out", default=None, help="output folder (default: a temporary folder with --check)")
    for name, value in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--partial", default=None, help="also save the weights at every evaluation into this folder")
    parser.add_argument("--check", action="store_true", help="retrain with the shipped settings and compare")
    parser.add_argument("--tolerance", type=float, default=0.1, help="--check: zero-shot points allowed off")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    settings = {name: getattr(args, name) for name in DEFAULTS}
    if args.check:
        if not SHIPPED_MANIFEST.is_file():
            sys.exit(f"clipadapt: error: no shipped manifest at {SHIPPED_MANIFEST}")
        shipped = json.loads(SHIPPED_MANIFEST.read_text())
        settings = shipped["settings"]
        out = args.out or tempfile.mkdtemp(prefix="clipadapt-toy-check-")
        manifest = pretrain(out, **settings, eval_per_class=shipped["eval"]["per_class"])
        if manifest["sha256"] == shipped["sha256"]:
            print(f"same weights as shipped (sha256 {manifest['sha256']})")  # a command's result
            return
        problems = compare(manifest, shipped, args.tolerance)
        if problems:
            sys.exit(f"clipadapt: error: retrained weights differ from the shipped ones: {'; '.join(problems)}")
        print(f"other bytes (sha256 {manifest['sha256']}), same zero-shot accuracies within {args.tolerance} points")
        return
    if args.out is None:
        parser.error("--out is required (or --check)")
    manifest = pretrain(args.out, **settings, out_partial=args.partial)
    print(json.dumps(manifest["zero_shot"], indent=2))


if __name__ == "__main__":
    main()
