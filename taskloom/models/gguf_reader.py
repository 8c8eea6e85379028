"""One shared, cached `gguf.GGUFReader` per file.

Opening a GGUF file parses every metadata field up front (for a 49k-token vocabulary that is
seconds of Python), and both the weight loader and the tokenizer need the same file: they
open it through `open_gguf`, which parses it once per process. Torch-free.
"""
from __future__ import annotations

import functools
import os

from gguf import GGUFReader


def open_gguf(path: str) -> GGUFReader:
    """The reader of the GGUF file at `path`, parsed once while the file is unchanged.

    Raises ValueError naming the file when it is not a readable GGUF file (truncated,
    corrupt, or another format): the reader itself raises whatever numpy or struct hit first.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    try:
        return _open(real, st.st_mtime_ns, st.st_size)
    except Exception as e:  # noqa: BLE001 - the reader's errors are arbitrary
        raise ValueError(f"{path} is not a valid GGUF file: {type(e).__name__}: {e}") from None


@functools.lru_cache(maxsize=4)
def _open(path: str, mtime_ns: int, size: int) -> GGUFReader:
    return GGUFReader(path)
