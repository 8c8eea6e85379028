"""What every benchmark result carries (device, commit, date, command), how each benchmark
builds its engine (timed: `startup_s`), and what benchmarks that run a peer after taskloom in
one process share."""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse

    from taskloom.api import LLM

logger = logging.getLogger(__name__)


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's with the vector instructions torch uses on it (and AMX,
    which oneDNN's bf16 GEMMs use) and the threads: what a CPU result depends on."""
    import torch
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    from taskloom.runtime.dtypes import cpu_supports, cpuinfo_values
    model = next(iter(cpuinfo_values("model name")), None)
    isa = torch.backends.cpu.get_cpu_capability()
    if cpu_supports("_is_amx_tile_supported"):
        isa += "+AMX"
    return (f"cpu ({model or platform.processor() or platform.machine()}, "
            f"{platform.machine()}, {isa}, {torch.get_num_threads()} threads)")


def git_commit() -> str | None:
    """The commit of the checkout taskloom runs from, "-dirty" appended when the package's
    tracked files differ from it (a result then is of code no commit holds; a changed
    README or test does not count); None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True,
                                text=True, check=True, cwd=here).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no",
                                  "--", os.path.dirname(here)], capture_output=True,
                                 text=True, check=True, cwd=here).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return f"{commit}-dirty" if changed else commit


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def significant(x: float, digits: int = 4) -> float:
    """`x` to `digits` significant figures: rates that span orders of magnitude between a tiny
    model on a CPU and an 8B one on a GPU (TFLOP/s, their fractions) keep their precision,
    where rounding to fixed decimals turns 0.0007 into 0.001 and a ratio of two into noise."""
    return float(f"{x:.{digits}g}")


def _program() -> str:
    """`taskloom` for the command (or `python -m taskloom.cli`), else the script run."""
    name = os.path.basename(sys.argv[0])
    return "taskloom" if name in ("taskloom", "cli.py", "__main__.py") else f"python {sys.argv[0]}"


def run_info(device: str) -> dict:
    import torch
    return {
        "device": device_name(device),
        "commit": git_commit(),
        "date": utc_now(),
        "command": " ".join([_program()] + sys.argv[1:]),
        "torch": torch.__version__,
    }


def release_device_memory(device: str) -> None:
    """Give back the memory of the engine just deleted before a peer runs in the same process:
    collect its reference cycles (first out of the permanent generation, where `taskloom`
    froze the engine once built: taskloom.cli.make_llm) and empty the CUDA cache, so that a
    peer sizing its cache from the device's free memory (HF generate_batch) sees all of it."""
    import gc

    import torch
    gc.unfreeze()
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


def speculative_fields(llm: LLM) -> dict | None:
    """The engine's speculative decoding settings as a result records them (None: off)."""
    config = llm.config.speculative
    return None if config is None else dataclasses.asdict(config)


def window_fields(llm: LLM) -> dict | None:
    """The engine's sliding window as a result records it (None: full attention): the
    cache config's, or the model's own."""
    window = llm.engine.scheduler.kv.window
    return None if window is None else dataclasses.asdict(window)


def trace_path(a: argparse.Namespace, name: str) -> str | None:
    """Where to keep a profiled window's Chrome trace (`--profile-dir`), or None."""
    import os
    if not getattr(a, "profile_dir", None):
        return None
    os.makedirs(a.profile_dir, exist_ok=True)
    return os.path.join(a.profile_dir, f"{name}.json")


def write_json(path: str | None, result: dict) -> None:
    """Write the result as one JSON line to `path` (`--output-json`), if given."""
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(result) + "\n")


def add_profile(result: dict, key_holder: dict, a: argparse.Namespace,
                profile: Callable[[], dict]) -> None:
    """Profile after the timed run (`--profile`) without risking it: the result so far is
    written to `--output-json` first, so a profile that hangs past a device run's time limit
    leaves the timings; a profile that fails says why in `profile.error`."""
    write_json(getattr(a, "output_json", None), result)
    try:
        key_holder["profile"] = profile()
    except Exception as e:  # noqa: BLE001 - the timings stand; say why there is no profile
        logger.exception("profiling failed")
        key_holder["profile"] = {"error": f"{type(e).__name__}: {e}"}
