"""Test helper: how the Triton kernel tests run here. Without CUDA the kernels run on the CPU
through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton is
imported); with CUDA they run compiled (marked `gpu`) and the interpreter cases skip.
Importing this module skips the importing test module when triton is not installed."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (the dev extra installs "
                                              "it on Linux x86_64)")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

CUDA = torch.cuda.is_available()
# Triton's own library functions are interpreted only if triton was imported in that mode.
INTERPRETED = isinstance(triton.language.cdiv, InterpretedFunction)

INTERPRETER = pytest.mark.skipif(
    CUDA or not INTERPRETED,
    reason="needs the Triton interpreter: no CUDA device and TRITON_INTERPRET=1 before triton "
           "is imported (tests/conftest.py); with CUDA, CUDA_VISIBLE_DEVICES= runs these")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
DEVICES = [pytest.param("cpu", id="interpreter", marks=INTERPRETER),
           pytest.param("cuda", id="cuda", marks=GPU)]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
          pytest.param(torch.float16, id="fp16")]
