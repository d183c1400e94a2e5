"""How comet measures: `time_ms` (the median time of a call) and `environment` (where a
measurement ran: the columns every results row carries)."""
from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch


def package_version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "absent"


def environment(device: torch.device | None = None) -> dict:
    """Where a measurement ran: device name, torch, triton and the git commit of this checkout
    (`device`: the GPU measured on; default the current GPU, else the CPU)."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)")
    return {"gpu": gpu, "torch": torch.__version__, "triton": package_version("triton"), "commit": git_commit()}


def git_commit() -> str:
    """`git describe --always --dirty` of the installed source. The GPU machine gets the working
    tree without .git: there set COMET_GIT_COMMIT (else "unknown")."""
    if os.environ.get("COMET_GIT_COMMIT"):
        return os.environ["COMET_GIT_COMMIT"]
    git = shutil.which("git")
    if git is None:
        return "unknown"
    try:
        result = subprocess.run([git, "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() or "unknown"


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> tuple[float, object]:
    """Median milliseconds of `fn()` over `repeats` runs after `warmup` runs, and its last output."""
    for _ in range(warmup):
        out = fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out
