"""What every benchmark result carries (device, commit, date, command), how each benchmark
builds its engine (timed: `startup_s`), and what benchmarks that run a peer after taskloom in
one process share."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from taskloom.api import LLM


def device_name(device: str) -> str:
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_info(device: str) -> dict:
    import torch
    return {
        "device": device_name(device),
        "commit": git_commit(),
        "date": utc_now(),
        "command": " ".join(["taskloom"] + sys.argv[1:]),
        "torch": torch.__version__,
    }


def release_device_memory(device: str) -> None:
    """Give back the memory of the engine just deleted before a peer runs in the same process:
    collect its reference cycles and empty the CUDA cache, so that a peer sizing its cache
    from the device's free memory (HF generate_batch) sees all of it."""
    import gc

    import torch
    gc.collect()
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_llm(a: argparse.Namespace) -> tuple[LLM, float]:
    """The benchmark's LLM and the seconds building it took (weights, KV-pool sizing by a
    profiling step, CUDA-graph capture): what every benchmark process pays before it times
    anything, which decides how many fit in a device lease."""
    from taskloom.cli import make_llm   # imported late: it loads torch
    start = time.perf_counter()
    llm = make_llm(a)
    return llm, round(time.perf_counter() - start, 2)
