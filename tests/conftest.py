"""Session-wide test setup: the Triton interpreter where no CUDA device is present.

Triton picks the interpreter when a function is decorated with `@triton.jit`, its own library
functions included, and torch._dynamo imports triton whenever triton is installed, so
`TRITON_INTERPRET=1` must be in the environment before any test module is imported. It only
matters to the kernel tests (tests/ops/test_triton_kernels.py): without CUDA nothing else runs
Triton. Where CUDA is present the kernels are compiled and the variable is left alone.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
