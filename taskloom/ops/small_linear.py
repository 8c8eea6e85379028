"""The lm head for the few rows of a decode step on the CPU: a C loop over the vocabulary
matrix in bf16, or over a GGUF Q8_0 head kept 8-bit.

At a few rows an lm head is one pass over the largest matrix a decode step reads (SmolLM2's
tied embedding: 49,152 x 576, 57 MB in bf16), bound by how fast it streams from memory.
torch's bf16 GEMM (oneDNN) streams it at a third of the speed of a plain loop that takes one
weight row at a time and multiplies it with every row of x in AVX-512 BF16 dot products
(`csrc/small_linear.c`). A GGUF file's head is commonly Q8_0 (the embedded model's is): kept
8-bit, as int8 codes and a float32 scale per 32 weights (0.56 of the bf16 bytes), each group
is dequantized in registers to the bf16 values the model holds, and less comes from memory.
Measured on two EPYC (Zen 4) cores for that matrix (`python benchmarks/cpu_linear.py
--head`; a noisy machine, so as ratios to `F.linear` in the same run): 3.0x / 1.5x / 1.1x at
1 / 4 / 8 rows over bf16, 3.1x / 2.3x / 1.5x over Q8_0; 0.95x and 1.15x at 16 rows; slower
from 32 (0.66x, 0.76x), where a GEMM's blocking pays (far more on a CPU with AMX). So a
bf16 CPU model takes its logits from a `SmallBatchHead` up to `SMALL_BATCH_MAX_ROWS` rows
and from `F.linear` above: over its own bf16 weight (no copy), or with
`quantization="gguf"` over the file's Q8_0 head (a copy: the bf16 one stays for the larger
calls, and for the embedding lookup).

The output is the bf16 GEMM's: products of bf16 values summed in float32, rounded once to
bf16 (only the order of the sums differs), so a row's logits do not depend on which head ran
by more than a bf16 rounding. The loader attaches a head where the model runs on the CPU in
bf16 and the kernel builds with its vector dot products (`small_linear_worthwhile`), unless
`TASKLOOM_CPU_KERNELS=0`: its scalar loop and the torch path here (`q8_linear_ref`, the
tests' reference) are slower than `F.linear`.
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
# Rows up to which the model's logits take its small-batch head (see the module docstring).
SMALL_BATCH_MAX_ROWS = 8


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


_P, _I = ctypes.c_void_p, ctypes.c_int64


@lru_cache(maxsize=1)
def library() -> Any:
    """The compiled `csrc/small_linear.c` with its signatures, or None where it cannot be
    built here."""
    lib = load_kernel("small_linear")
    if lib is None:
        return None
    lib.bf16_linear_bf16.argtypes = [_P, _I, _I, _P, _I, _I, _I, _P, _I]
    lib.q8_linear_bf16.argtypes = [_P, _I, _I, _P, _P, _I, _I, _P, _I]
    for fn in (lib.bf16_linear_bf16, lib.q8_linear_bf16, lib.small_linear_vectorized):
        fn.restype = ctypes.c_int
    return lib


@lru_cache(maxsize=1)
def small_linear_worthwhile() -> bool:
    """Whether the C kernel builds here with AVX-512 BF16 dot products (its scalar loop is
    slower than `F.linear`)."""
    lib = library()
    return lib is not None and bool(lib.small_linear_vectorized())


def q8_linear_ref(x: torch.Tensor, weight: Q8Weight) -> torch.Tensor:
    """x [n, k] bf16 -> x W^T [n, rows] bf16, by torch: W dequantized to bf16, `F.linear`."""
    return F.linear(x, weight.dequantize().to(x.dtype))


class SmallBatchHead(nn.Module):
    """`F.linear(x, w)` (no bias) for bf16 x [n, in_features] by the C kernel, for calls of at
    most `max_rows` rows (the model checks). `weight` is the model's own bf16 head [out, in]
    (held as a plain tensor on the same storage: not a second parameter, not a copy) or a
    Q8Weight, whose codes and scales become buffers (not parameters: what counts a model's
    parameters counts its bf16 head); `nbytes` is what a call reads of it."""

    def __init__(self, weight: torch.Tensor | Q8Weight,
                 max_rows: int = SMALL_BATCH_MAX_ROWS) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.max_rows = max_rows
        self.bf16: torch.Tensor | None = None
        if isinstance(weight, Q8Weight):
            self.register_buffer("codes", weight.codes.contiguous(), persistent=False)
            self.register_buffer("scales", weight.scales.contiguous(), persistent=False)
            self.nbytes = sum(b.numel() * b.element_size() for b in (self.codes, self.scales))
        else:
            if (weight.dtype != torch.bfloat16 or weight.dim() != 2 or weight.stride(1) != 1
                    or self.in_features % Q8_GROUP):
                raise ValueError(f"a small-batch head takes a bf16 [out, in % {Q8_GROUP} == 0] "
                                 f"weight with contiguous rows, got {weight.dtype} "
                                 f"{tuple(weight.shape)}")
            self.bf16 = weight.detach()
            self.nbytes = weight.numel() * weight.element_size()

    @property
    def holds_copy(self) -> bool:
        """Whether this head holds its own weights (the 8-bit copy beside the model's head)
        rather than reading the model's."""
        return self.bf16 is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"expected x [n, {self.in_features}], got {tuple(x.shape)}")
        lib = library()
        if lib is None or x.dtype != torch.bfloat16 or not x.is_cpu:
            return (F.linear(x, self.bf16.to(x.dtype)) if self.bf16 is not None
                    else q8_linear_ref(x, Q8Weight(self.codes, self.scales)))
        x = x.contiguous()
        y = x.new_empty(x.shape[0], self.out_features)
        if not x.shape[0]:
            return y
        if self.bf16 is not None:
            status = call_kernel(lib.bf16_linear_bf16, x.data_ptr(), self.in_features,
                                 x.shape[0], self.bf16.data_ptr(), self.bf16.stride(0),
                                 self.out_features, self.in_features, y.data_ptr(),
                                 self.out_features)
        else:
            status = call_kernel(lib.q8_linear_bf16, x.data_ptr(), self.in_features,
                                 x.shape[0], self.codes.data_ptr(), self.scales.data_ptr(),
                                 self.out_features, self.in_features, y.data_ptr(),
                                 self.out_features)
        if status == 2:
            raise MemoryError("small_linear could not allocate its row buffer")
        assert status == 0, f"small_linear returned {status}"
        return y

    def extra_repr(self) -> str:
        kind = "bf16, the model's weight" if self.bf16 is not None else "Q8_0 groups of 32"
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, "
                f"up to {self.max_rows} rows")
