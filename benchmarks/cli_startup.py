"""Benchmark: how long the `clipadapt` command takes to answer, per subcommand (issue 10 §6: `--help` < 3 s).

    python benchmarks/cli_startup.py             # 5 runs of each, median wall-clock seconds

`clipadapt --help` and our own subcommands import torch, Lightning and open_clip only when they run;
`fit --help` builds the LightningCLI parser, so it pays for them.
"""

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "clipadapt --help": ["--help"],
    "clipadapt report --help": ["report", "--help"],
    "clipadapt fit --help": ["fit", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for name, argv in COMMANDS.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "clipadapt.cli", *argv], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        print(f"{name:26} median {statistics.median(times):5.2f} s  (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
