"""benchmarks/gpu_check.py runs every method on CPU at small sizes, so it is ready for the day a GPU is lent."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402

from clipadapt.methods import METHODS  # noqa: E402


def test_gpu_check_measures_every_method_on_cpu(tmp_path):
    out = tmp_path / "check.json"
    small = ["--arch", "clipadapt-tiny", "--device", "cpu", "--batch-size", "2", "--eval-batch-size", "4",
             "--tpt-batch-size", "1", "--classes", "4", "--iters", "1", "--warmup", "1", "--peak-tflops", "1"]  # fmt: skip
    gpu_check.main([*small, "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["methods"]) == set(METHODS) and "cpu" in report["machine"]
    for name, line in report["methods"].items():
        assert "error" not in line, (name, line)
        assert line["eval_images_per_s"] > 0 and line["eval_flops_per_image"] > 0 and 0 < line["eval_mfu"]
        assert (name in gpu_check.EVAL_ONLY) != ("train_images_per_s" in line), name
    reference = report["reference_open_clip"]
    # FLOPs are counted, not guessed: a training step (forward + backward) costs about 3x the forward.
    assert 2 < reference["train_flops_per_image"] / reference["eval_flops_per_image"] < 4


def test_the_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_check.sh")]).returncode == 0
