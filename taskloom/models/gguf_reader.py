"""One shared, cached `gguf.GGUFReader` per file.

Opening a GGUF file parses every metadata field up front, and both the weight loader and the
tokenizer need the same file: they open it through `open_gguf`, which parses it once per
process. Torch-free.

The reader slices its `np.memmap` once per value, twice per string: for a 49k-token vocabulary
and its merges that is 200k slices, and each slice of a memmap pays numpy's memmap
bookkeeping (`__array_finalize__`, `__getitem__`), 5 s of the embedded model's 6 s start on
2 cores. `_Reader` slices a plain ndarray view of the same mapping instead: the same bytes,
the same zero-copy arrays (tensor data still points into the file), a third of the time.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
from gguf import GGUFReader


class _Reader(GGUFReader):
    """GGUFReader whose values are sliced from a plain-ndarray view of its memmap."""

    def _get(self, offset: int, dtype: Any, count: int = 1,
             override_order: str | None = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        dt = np.dtype(dtype)
        count = int(count)
        arr = plain[offset:offset + dt.itemsize * count].view(dt)[:count]
        return arr.view(dt.newbyteorder(self.byte_order if override_order is None
                                        else override_order))


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
    return _Reader(path)
