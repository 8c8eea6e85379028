"""Small C kernels for the CPU path, compiled on first use with the machine's C compiler.

Some CPU work is many elementwise passes in eager torch that one loop does at memory speed:
unpacking a 4-bit weight to bf16 is four torch operations (about 1.4 ms for SmolLM2's 3072 x
576 gate/up on a Sapphire Rapids core) and one C loop (0.28 ms); a bf16 decoder layer's norms,
rotary, activation and decode attention are ~100 torch operations and four C calls
(`taskloom.ops.cpu_kernels`). The sources sit next to this file (`csrc/`, with the headers
they share); each is compiled once per machine (`$CC`, else `cc`, with `-O3 -march=native
-fopenmp`: about a second) into a shared library cached under
`$XDG_CACHE_HOME/taskloom/kernels` (default `~/.cache`), keyed by the source, its headers, the
flags and the CPU, and called through ctypes, which releases the GIL. Where there is no compiler or
the build fails, `load_kernel` says why once and returns None, and the caller runs its torch
path: every kernel here has one, and the tests hold the two to the same bits.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from taskloom.runtime.dtypes import cpuinfo_values

logger = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
# no fused multiply-add: each kernel rounds as its torch path does. OpenMP: loaded after
# torch, a kernel's libgomp.so.1 is torch's, so its threads are torch's threads.
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp",
          "-shared", "-fPIC")


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "taskloom" / "kernels"


def _cpu_key() -> str:
    """What -march=native compiles for: the CPU's model and flags, where Linux says."""
    known = cpuinfo_values("model name") + cpuinfo_values("flags")
    return "\n".join(known) or platform.processor() or platform.machine()


@lru_cache(maxsize=None)
def load_kernel(name: str) -> ctypes.CDLL | None:
    """The compiled library of `csrc/<name>.c`, built if it is not cached yet; None (logged
    once) where it cannot be built or loaded."""
    source = CSRC / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler on PATH: %s runs its torch path (slower)", name)
        return None
    text = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(text + " ".join(CFLAGS).encode() + _cpu_key().encode()).hexdigest()
    target = cache_dir() / f"{name}-{key[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, source, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or e
        logger.warning("cannot build the C kernel %s (%s): it runs its torch path (slower)",
                       name, str(detail).strip()[:500])
        return None


def _build(compiler: str, source: Path, target: Path) -> None:
    """Compile into a temporary file beside `target`, then move it into place (atomic: two
    processes building at once both end with a whole library)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, "-o", tmp, str(source), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("compiled the C kernel %s -> %s", source.name, target)
