"""Benchmark: training and evaluation throughput of a method's module on the present device.

    python benchmarks/methods.py --method ast                   # ViT-B-16, random init, cuda if present
    python benchmarks/methods.py --method ast --batch-size 32 --eval-batch-size 256 --iters 20
    python benchmarks/methods.py --method tpt --arch clipadapt-tiny --classes 37

Random weights are enough (`pretrained=None`): the cost does not depend on the values. Each method
adds one function to `BENCHMARKS` (name -> fn(args, device)); they share the flags below. CPU
defaults are small (batch 8, a few iterations: a minute or two); GPU defaults are the protocol's.
"""

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import open_clip
import torch
import torch.nn.functional as F

from clipadapt.methods.adapt import Adapt
from clipadapt.methods.cite import CLIPCITE
from clipadapt.methods.clip_ast import CLIPAST
from clipadapt.methods.prompting.tpt import TPT
from clipadapt.methods.rada import RAda
from clipadapt.testtime import augmented_views


def seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    """Wall-clock time of each of `repeats` calls, synchronising the GPU around each."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def autocast(args: argparse.Namespace, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")


def training_rate(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, args: argparse.Namespace, device: torch.device
) -> float:
    """Images/s of whole training steps (the method's losses, backward, optimizer step), median of `args.iters`."""
    size = model.clip.image_size
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, args.classes, (args.batch_size,), device=device)

    def train_step() -> None:
        with autocast(args, device):
            loss = sum(model.training_losses(images, labels).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds(train_step, args.warmup, device)
    return args.batch_size / statistics.median(seconds(train_step, args.iters, device))


def bench_ast(args: argparse.Namespace, device: torch.device) -> None:
    """CLIP-AST stage 2 (K=6 tensors per block, both towers, Eq. 11 loss) and evaluation vs plain open_clip."""
    classnames = [f"class {i}" for i in range(args.classes)]
    # The random scheme has no probe and selects as many tensors per block as the adaptive one: the
    # step costs the same (backward reaches the first block of both towers either way).
    model = CLIPAST(classnames, ["a photo of a {}."], arch=args.arch, pretrained=None, scheme="random").to(device)
    model.stage = "selective"
    params = model._apply_stage("selective")  # freezes the rest, as at the stage boundary
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4)
    model._teacher_features()  # computed once at fit start in a real run, not per step
    trainable = sum(p.numel() for p in params)
    print(f"trainable: {len(params)} tensors, {trainable / 1e6:.1f} M parameters (text tower recomputed every step)")
    train_ips = training_rate(model, optimizer, args, device)

    # Evaluation: the module's own classify vs a plain open_clip model built from the exported state dict.
    model.eval()
    plain = open_clip.create_model(args.arch, pretrained=None).to(device).eval()
    plain.load_state_dict(model.export_state_dict())
    eval_images = torch.randn(args.eval_batch_size, 3, model.clip.image_size, model.clip.image_size, device=device)
    with torch.no_grad():
        text = model.class_embeddings(classnames, model.hparams.templates)  # (C, D), cached as in testing

    def tuned_eval() -> None:
        with torch.inference_mode(), autocast(args, device):
            model.classify(eval_images, text)

    def plain_eval() -> None:
        with torch.inference_mode(), autocast(args, device):
            plain.logit_scale.exp() * F.normalize(plain.encode_image(eval_images), dim=-1) @ text.T

    seconds(tuned_eval, args.warmup, device)
    seconds(plain_eval, args.warmup, device)
    tuned_t, plain_t = [], []
    for _ in range(args.iters):  # interleaved, so drift (clocks, other load) hits both alike
        tuned_t += seconds(tuned_eval, 1, device)
        plain_t += seconds(plain_eval, 1, device)
    tuned_ips = args.eval_batch_size / statistics.median(tuned_t)
    plain_ips = args.eval_batch_size / statistics.median(plain_t)
    ratio = tuned_ips / plain_ips

    print(f"stage-2 training : {train_ips:9.1f} images/s (batch {args.batch_size}, median of {args.iters} steps)")
    print(f"eval, CLIP-AST   : {tuned_ips:9.1f} images/s (batch {args.eval_batch_size}, module.classify)")
    print(f"eval, open_clip  : {plain_ips:9.1f} images/s (encode_image of the exported weights)")
    verdict = "within" if abs(ratio - 1) <= 0.05 else "NOT within"
    print(f"eval ratio       : {ratio:.3f} ({verdict} 5% of plain CLIP; the tuned model has no extra parameters)")


def peak_memory(device: torch.device) -> str:
    """Peak memory so far: allocated CUDA memory since the last reset, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB CUDA (max allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process peak RSS, CPU)"


def bench_rada(args: argparse.Namespace, device: torch.device) -> None:
    """RAda: EFT training step, TTT adaptation batched vs one by one, and the cost of encoding the views."""
    classnames = [f"class {i}" for i in range(args.classes)]
    model = RAda(classnames, ["a photo of a {}."], arch=args.arch, pretrained=None, setting="eft").to(device)
    size = model.clip.image_size
    params = model._apply_stage("train")
    optimizer = torch.optim.Adam(params, lr=9e-4, weight_decay=5e-4)
    print(f"adapter: {sum(p.numel() for p in params) / 1e6:.2f} M parameters; C = {args.classes} classes")
    train_ips = training_rate(model, optimizer, args, device)
    print(f"EFT training     : {train_ips:9.1f} images/s (batch {args.batch_size}, median of {args.iters} steps)")
    print(f"  peak memory    : {peak_memory(device)}")

    # TTT: the 64 view features per test image come from the frozen tower; the adaptation itself is
    # timed on those features, batched (vmap) and one sample at a time (torch.optim.AdamW loop).
    ttt = RAda(classnames, ["a photo of a {}."], arch=args.arch, pretrained=None, setting="ttt").to(device).eval()
    views, samples = ttt.hparams.ttt_views, args.eval_batch_size
    with torch.no_grad():
        text = ttt.class_embeddings(classnames, ttt.hparams.templates).float()  # (C, D)
    tests = torch.randn(samples, 3, size, size, device=device)

    def encode_views() -> None:  # view generation + the frozen tower on V views of one image
        with torch.no_grad(), autocast(args, device):
            ttt._features(ttt._views(tests[:1]).flatten(0, 1))

    seconds(encode_views, 1, device)
    encode_s = statistics.median(seconds(encode_views, max(1, args.iters // 2), device))
    features = F.normalize(torch.randn(samples, views, ttt.clip.embed_dim, device=device), dim=-1)  # (N, V, D)
    results = {}
    for mode in ("batched", "loop"):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def adapt(mode: str = mode) -> None:
            with autocast(args, device):
                ttt.adapt(features, text, mode=mode)

        seconds(adapt, 1, device)
        results[mode] = samples / statistics.median(seconds(adapt, args.iters, device))
        print(f"TTT adapt {mode:7}: {results[mode]:9.1f} samples/s ({samples} samples x {views} views, 3 steps)")
        print(f"  peak memory    : {peak_memory(device)}")
    print(f"TTT batched/loop : {results['batched'] / results['loop']:.2f}x (adaptation only)")
    print(f"TTT views encode : {views / encode_s:9.1f} images/s ({encode_s:.2f} s per test image for {views} views)")
    for mode, rate in results.items():
        print(f"TTT end-to-end   : {1 / (encode_s + 1 / rate):9.2f} samples/s {mode} (view encoding + adaptation)")


def bench_cite(args: argparse.Namespace, device: torch.device) -> None:
    """CLIP-CITE: one full fine-tuning step (both towers, DVA + SCL + VLD with the frozen image teacher)."""
    classnames = [f"class {i}" for i in range(args.classes)]
    model = CLIPCITE(classnames, ["a photo of a {}."], arch=args.arch, pretrained=None).to(device)
    params = model._apply_stage("train")
    optimizer = torch.optim.AdamW(params, lr=5e-6, weight_decay=0.01)
    trainable = sum(p.numel() for p in params)
    print(f"trainable: {trainable / 1e6:.1f} M parameters (all but the logit scale); C = {args.classes} class prompts")
    train_ips = training_rate(model, optimizer, args, device)
    print(f"training         : {train_ips:9.1f} images/s (batch {args.batch_size}, median of {args.iters} steps)")
    print(f"  peak memory    : {peak_memory(device)}")

    def ensemble() -> None:
        model.weights = "finetuned"  # as after a fit
        model.apply_ensemble()

    ensemble_s = statistics.median(seconds(ensemble, 1, device))
    print(f"weight ensemble  : {ensemble_s:9.3f} s once at the end of fit (θ_zs of the text tower copied from CPU)")


def bench_adapt(args: argparse.Namespace, device: torch.device) -> None:
    """Adapt: training step with T_target=128 live K/V prompt tokens vs all 384 vs no prompts; evaluation cost."""
    classnames = [f"class {i}" for i in range(args.classes)]
    model = Adapt(classnames, ["a photo of a {}."], arch=args.arch, pretrained=None).to(device)
    prompts = model.kv_prompts
    params = model._apply_stage("train")
    optimizer = torch.optim.SGD(params, lr=2.5e-3, momentum=0.9, weight_decay=5e-4)
    full = {t: torch.ones_like(m) for t, m in prompts.masks().items()}
    total = sum(m.numel() for m in full.values())
    target = min(model.hparams.target_length, total)
    keep = torch.randperm(total)[:target]  # a random T_target-token pattern: the cost depends on the count only
    flat = torch.zeros(total, dtype=torch.bool)
    flat[keep] = True
    sizes = [m.numel() for m in full.values()]
    pruned = {t: part.view_as(full[t]) for t, part in zip(full, flat.split(sizes), strict=True)}
    none = {t: torch.zeros_like(m) for t, m in full.items()}
    images = torch.randn(args.batch_size, 3, model.clip.image_size, model.clip.image_size, device=device)

    def frozen_step() -> None:  # no prompts: nothing to train, so the forward of both towers only
        with torch.no_grad(), autocast(args, device):
            model(images)

    print(f"C = {args.classes} classes: the text tower runs over every class prompt at each step, as in training")
    rates = {}
    pruned_name, full_name = f"T_target={target}", f"all {total}"
    for name, masks in ((pruned_name, pruned), (full_name, full)):
        prompts.set_masks(masks)
        rates[name] = training_rate(model, optimizer, args, device)
        live = prompts.live()
        print(
            f"training {name:12}: {rates[name]:9.1f} images/s ({live} live tokens, "
            f"{prompts.live_parameters():,} live parameters, extra K/V keys per block: "
            + ", ".join(f"{t} {100 * v:.0f}%" for t, v in model.extra_kv_fraction().items())
            + ")"
        )
    prompts.set_masks(none)
    seconds(frozen_step, args.warmup, device)
    rates["none"] = args.batch_size / statistics.median(seconds(frozen_step, args.iters, device))
    print(f"no prompts (fwd only): {rates['none']:9.1f} images/s (frozen CLIP, no backward: a lower bound on cost)")
    print(f"{pruned_name} vs {full_name} training: {rates[pruned_name] / rates[full_name]:.2f}x")

    # Evaluation: masked prompts vs the compact export vs plain CLIP, text embeddings precomputed.
    prompts.set_masks(pruned)
    model.eval()
    compact = model.compact_prompts().to(device)
    eval_images = torch.randn(args.eval_batch_size, 3, model.clip.image_size, model.clip.image_size, device=device)
    timings: dict[str, list[float]] = {"masked": [], "compact": [], "plain": []}
    runs = {
        "masked": lambda: model.clip.encode_image(eval_images, prompts=prompts),
        "compact": lambda: model.clip.encode_image(eval_images, prompts=compact),
        "plain": lambda: model.clip.encode_image(eval_images),
    }
    for name, fn in runs.items():

        def run(fn: Callable[[], object] = fn) -> None:
            with torch.inference_mode(), autocast(args, device):
                fn()

        runs[name] = run
        seconds(run, args.warmup, device)
    for _ in range(args.iters):  # interleaved, so drift hits all alike
        for name, run in runs.items():
            timings[name] += seconds(run, 1, device)
    for name, times in timings.items():
        print(f"eval image {name:8}: {args.eval_batch_size / statistics.median(times):9.1f} images/s")


def bench_tpt(args: argparse.Namespace, device: torch.device) -> None:
    """TPT: view drawing (crop, AugMix) + encoding, and the per-image tuning with the first step's text forward shared."""
    classnames = [f"class {i}" for i in range(args.classes)]
    model = TPT(classnames, ["a photo of a {}."], arch=args.arch, pretrained=None).to(device).eval()
    views, size = model.hparams.views, model.clip.image_size
    samples = min(args.eval_batch_size, 16)  # each image is tuned alone: the batch only shares one text forward
    tests = torch.randn(samples, 3, size, size, device=device)
    print(f"C = {args.classes} classes, {views} views, {samples} test images per batch, 1 AdamW step")
    for augment in ("crop", "augmix"):

        def encode(augment: str = augment) -> None:  # the views of one image through the frozen image tower
            with torch.no_grad(), autocast(args, device):
                model.clip.encode_image(augmented_views(tests[:1], views, 0, augment)[0])

        seconds(encode, 1, device)
        encode_s = statistics.median(seconds(encode, max(1, args.iters // 2), device))
        print(f"views {augment:6} + encode: {encode_s * 1e3:9.1f} ms per test image")
    features = F.normalize(torch.randn(samples, views, model.clip.embed_dim, device=device), dim=-1)  # (N, V, D)
    rates = {}
    for name, batch in (("shared", samples), ("alone", 1)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def tune(batch: int = batch) -> None:
            with autocast(args, device):
                for chunk in features.split(batch):
                    model.tune(chunk, classnames)

        seconds(tune, 1, device)
        rates[name] = samples / statistics.median(seconds(tune, args.iters, device))
        print(f"tune, first text forward {name:6}: {rates[name]:9.1f} images/s;  peak memory {peak_memory(device)}")
    print(f"shared / alone   : {rates['shared'] / rates['alone']:.2f}x (the tuning only; both are exact)")

    def predict() -> None:
        with torch.no_grad(), autocast(args, device):
            model.class_logits(tests, classnames, [])

    seconds(predict, 1, device)
    print(
        f"end-to-end       : {samples / statistics.median(seconds(predict, max(1, args.iters // 2), device)):9.2f} images/s"
    )


BENCHMARKS: dict[str, Callable[[argparse.Namespace, torch.device], None]] = {
    "adapt": bench_adapt,
    "ast": bench_ast,
    "cite": bench_cite,
    "rada": bench_rada,
    "tpt": bench_tpt,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(BENCHMARKS), required=True)
    parser.add_argument("--arch", default="ViT-B-16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["bf16-mixed", "32-true"], default=None, help="default: bf16 on GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="training batch (GPU 32, CPU 8)")
    parser.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch (GPU 256, CPU 8)")
    parser.add_argument("--classes", type=int, default=None, help="training classes (GPU 100, CPU 10)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations (GPU 20, CPU 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed iterations first (GPU 3, CPU 1)")
    args = parser.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    defaults = {
        "precision": "bf16-mixed" if gpu else "32-true",
        "batch_size": 32 if gpu else 8,
        "eval_batch_size": 256 if gpu else 8,
        "classes": 100 if gpu else 10,
        "iters": 20 if gpu else 3,
        "warmup": 3 if gpu else 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    where = torch.cuda.get_device_name(device) if gpu else f"cpu, {torch.get_num_threads()} threads"
    print(f"device: {where}; method {args.method}; arch {args.arch} (random init); precision {args.precision}")
    torch.manual_seed(0)
    BENCHMARKS[args.method](args, device)


if __name__ == "__main__":
    main()
