"""An lm head over GGUF Q8_0 weights kept 8-bit, for the few rows of a decode step.

A GGUF file's vocabulary matrix is commonly Q8_0 (the embedded SmolLM2's tied embedding is:
49,152 x 576, 32 MB as 8-bit codes and a float32 scale per 32, 57 MB in bf16). In bf16 it
is the largest single matrix a decode step reads, and at a few rows that read is the whole
cost of the lm head: memory-bound. `Q8Linear` multiplies by the 8-bit form directly
(`csrc/q8_linear.c`): each block of weights is dequantized in the cache to the bf16 values
the model holds and multiplied with AVX-512 BF16 dot products, so 0.56 of the bytes come
from memory (a byte a weight and a float32 scale per 32). Measured on two EPYC (Zen 4) cores for that matrix (`python benchmarks/
cpu_linear.py --q8`), against bf16 `F.linear` on the same values: 1.8 / 2.4 / 3.4 ms at
1 / 4 / 8 rows against 3.2 / 3.7 / 4.3, 5.2 against 5.6 at 16, but slower from 32 rows (8.9
against 7.6; 18.6 against 12.5 at 64): the kernel's dot products are AVX-512's, and a bf16
GEMM gains more from the rows (far more on a CPU with AMX). So the model keeps its bf16
head as well and uses this one up to `Q8_HEAD_MAX_ROWS` rows: the cost is the 8-bit copy's
memory (0.56 of the bf16 one's again), the time saved is at batch sizes 1-8, the ones a
laptop serves.

The output is the bf16 GEMM's: products of bf16 values summed in float32, rounded once to
bf16 (only the order of the sums differs), so a row's logits do not depend on which head ran
by more than a bf16 rounding. The loader attaches the head where the file's head is Q8_0,
the model runs on the CPU in bf16, and the C kernel builds with its vector dot products
(`q8_head_worthwhile`); elsewhere there is no head of this kind (the kernel's scalar loop
and the torch path here, `q8_linear_ref`, the tests' reference, are slower than `F.linear`
on bf16 weights).
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from taskloom.ops.cpu_kernels import call_kernel
from taskloom.ops.cpu_native import load_kernel

Q8_GROUP = 32
# Rows up to which the model's logits take the 8-bit head (see the module docstring).
Q8_HEAD_MAX_ROWS = 8


@dataclass
class Q8Weight:
    """A weight [rows, cols] as int8 codes and a float32 scale per 32 columns: `w[r, c] =
    codes[r, c] * scales[r, c // 32]` (a float32 product, GGUF's Q8_0 value)."""

    codes: torch.Tensor     # [rows, cols] int8
    scales: torch.Tensor    # [rows, cols // 32] float32

    def __post_init__(self) -> None:
        rows, cols = self.codes.shape
        if (self.codes.dtype != torch.int8 or self.scales.dtype != torch.float32
                or cols % Q8_GROUP or tuple(self.scales.shape) != (rows, cols // Q8_GROUP)):
            raise ValueError(f"a Q8 weight is int8 codes [rows, cols % {Q8_GROUP} == 0] and "
                             f"float32 scales [rows, cols / {Q8_GROUP}], got "
                             f"{self.codes.dtype} {tuple(self.codes.shape)} and "
                             f"{self.scales.dtype} {tuple(self.scales.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [rows, cols]."""
        rows, cols = self.codes.shape
        q = self.codes.view(rows, cols // Q8_GROUP, Q8_GROUP).float()
        return (q * self.scales[..., None]).view(rows, cols)


@lru_cache(maxsize=1)
def native_q8_linear() -> Any:
    """The C kernel (`csrc/q8_linear.c`), or None where it cannot be built here."""
    lib = load_kernel("q8_linear")
    if lib is None:
        return None
    fn = lib.q8_linear_bf16
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


@lru_cache(maxsize=1)
def q8_head_worthwhile() -> bool:
    """Whether the C kernel builds here with AVX-512 BF16 dot products (its scalar loop is
    slower than a bf16 head)."""
    lib = load_kernel("q8_linear")
    return native_q8_linear() is not None and bool(lib.q8_linear_vectorized())


def q8_linear_ref(x: torch.Tensor, weight: Q8Weight) -> torch.Tensor:
    """x [n, k] bf16 -> x W^T [n, rows] bf16, by torch: W dequantized to bf16, `F.linear`."""
    return F.linear(x, weight.dequantize().to(x.dtype))


class Q8Linear(nn.Module):
    """`F.linear(x, w)` (no bias) for bf16 x [n, in_features] over a Q8 weight w
    [out_features, in_features], by the C kernel; `codes` and `scales` are buffers, not
    parameters: the model's bf16 head stays its weight (what counts a model's parameters
    counts that one)."""

    def __init__(self, weight: Q8Weight, max_rows: int = Q8_HEAD_MAX_ROWS) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows      # as a model's small-batch head: the rows it takes
        self.register_buffer("codes", weight.codes.contiguous(), persistent=False)
        self.register_buffer("scales", weight.scales.contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected x [n, {self.in_features}], got {tuple(x.shape)}")
        fn = native_q8_linear()
        if fn is None or x.dtype != torch.bfloat16 or not x.is_cpu:
            return q8_linear_ref(x, Q8Weight(self.codes, self.scales))
        x = x.contiguous()
        y = x.new_empty(x.shape[0], self.out_features)
        if x.shape[0]:
            status = call_kernel(fn, x.data_ptr(), self.in_features, x.shape[0],
                                 self.codes.data_ptr(), self.scales.data_ptr(),
                                 self.out_features, self.in_features, y.data_ptr(),
                                 self.out_features)
            if status == 2:
                raise MemoryError("q8_linear_bf16 could not allocate its dequantized block")
            assert status == 0, f"q8_linear_bf16 returned {status}"
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"Q8_0 groups of {Q8_GROUP}")
