"""What every benchmark result carries: device, commit, date, command."""
from __future__ import annotations

import datetime
import platform
import subprocess
import sys


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
