"""Calibrate tests/test_behaviour_baselines.py: its runs over seeds 1, 2, 3, with novel classes too.

    python tests/calibrate_baselines.py [--out DIR] [--seeds 1 2 3] [--runs CoOp KgCoOp ...] [--no-tpt]

Prints, per seed and run, top-1 % on base, novel (HM) and the pretraining domain `toy`, the seconds each took,
and TPT's correct predictions next to zero-shot CLIP's; then one table (mean ± std over the seeds) to paste into
the note. The toy data are written into DIR on first use (default: a temporary folder).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from test_behaviour_baselines import RECIPES, adapt, tpt_and_zero_shot  # noqa: E402

from clipadapt.methods.base import harmonic_mean  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--runs", nargs="+", default=list(RECIPES))
    parser.add_argument("--no-tpt", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = args.out or Path(tempfile.mkdtemp(prefix="calibrate_"))
    rows: dict[str, dict[int, dict[str, float]]] = {}
    for seed in args.seeds:
        for name in args.runs:
            start = time.time()
            for run, accs in adapt(root, root / "runs", name, seed, ["base", "novel", "toy"]).items():
                accs["hm"] = harmonic_mean(accs["base"], accs["novel"])
                rows.setdefault(run, {})[seed] = accs
                print(f"seed {seed} {run:<13} " + " ".join(f"{k} {v:5.1f}" for k, v in accs.items())
                      + f"  ({time.time() - start:.0f} s)", flush=True)  # fmt: skip
        if not args.no_tpt:
            for per_class in (8, None):
                start = time.time()
                tuned, plain, images = tpt_and_zero_shot(root, seed, per_class)
                rows.setdefault(f"TPT-{images}", {})[seed] = {"tpt": tuned, "zero_shot": plain, "gain": tuned - plain}
                print(f"seed {seed} TPT on {images} images: {tuned} correct, zero-shot {plain} "
                      f"({time.time() - start:.0f} s)", flush=True)  # fmt: skip
    print(json.dumps(rows, indent=1))
    print("| run | " + " | ".join(["base", "novel", "HM", "toy"]) + " |\n|---|---|---|---|---|")
    for run, seeds in rows.items():
        if run.startswith("TPT"):
            continue
        cells = []
        for key in ("base", "novel", "hm", "toy"):
            values = [seeds[s][key] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}")
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
