"""What a benchmark ran on: device, CPU model (from /proc/cpuinfo), threads, load; printed beside every number."""

import os
import time
from collections.abc import Callable

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def describe(device: torch.device | str = "cpu") -> str:
    """One line: the device, the CPU model, torch threads, cores and the 1-minute load average."""
    device = torch.device(device)
    gpu = f"{torch.cuda.get_device_name(device)}; " if device.type == "cuda" else ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{gpu}cpu {cpu_model()}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores, "
        f"load {load:.1f} (a shared machine: numbers move with the load); torch {torch.__version__}"
    )


def seconds(fn: Callable[[], object], repeats: int, device: torch.device | str = "cpu") -> list[float]:
    """Wall-clock time of each of `repeats` calls, synchronising the GPU around each."""
    device = torch.device(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times
