"""4-bit linears by integer dot products, on CPUs with AVX-512 VNNI (Intel since Cascade
Lake, AMD since Zen 4).

torch's CPU int4 kernel (`TorchInt4Linear`) converts every code to float and multiplies in
float32, 16 products an instruction: from a few rows on, its time grows with the rows. VNNI's
vpdpbusd multiplies unsigned bytes by signed bytes, 64 products an instruction, and
`csrc/q4_linear.c` uses it over its own layout of the codes (tiles of 16 weight rows, so
that a vector's 16 lanes are 16 outputs and no sums cross lanes; scales and mins in fp16,
which holds GGUF's Q4_0/Q4_1 terms exactly and Q4_K's products d * sc to 11 bits).

The activations are quantized first, per row and group of 32, to a 16-bit code in two int8
parts: with xs = amax / 127, hi = round(x / xs) and lo = round(256 (x / xs - hi)), x = xs (hi
+ lo / 256) within xs / 512 (xs / 256 where lo saturates at 127). llama.cpp's one int8 part
(x = xs * hi, within xs / 2) halves the products but moves a row's outputs by ~0.5% of the
largest: measured on the embedded SmolLM2 (`python benchmarks/greedy_agreement.py --configs
float32 int4`, 50 prompts x 64 tokens, with a one-part build of this kernel), 4% of greedy
sequences identical to fp32's over the same weights and 23% of tokens before the first
difference, against 36% and 61% with two parts, which is what torch's kernel (and bf16)
gives. A group's sum is then `scale * xs / 256 * sum_c code_c (256 hi_c +
lo_c) + min * sum_c x_c`, the last with the group's float32 sum of x itself.

Measured on two EPYC (Zen 4) cores over a pass of SmolLM2-135M's projections (`python
benchmarks/cpu_linear.py --int4`; a noisy machine, so compare within a run): at one row both
kernels stream the 66 MB at the memory's speed (4.1 ms); at 8 / 32 / 128 rows this one takes
8.2 / 24 / 82 ms, torch's 11.6 / 42 / 164, and the unpack to bf16 then one GEMM (which
`TorchInt4Linear` runs above 40 rows) 108 from 128 rows; bf16 oneDNN-packed 13.2 / 24 / 72.
From 512 rows (long prefill chunks) the unpack and GEMM is as fast (runs disagree: 299 against
384 ms at 512 rows in one, 412 against 340 in another; 1,336 against 1,307 at 2,048), so one
kernel serves every call here; an unpack of this layout for such calls is left for when a
machine with AMX, whose bf16 GEMMs are far faster, says it pays. `int4_vnni_ref` is the
kernel's arithmetic in torch (float64 sums), the tests' reference.
"""
from __future__ import annotations

import ctypes
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from taskloom.ops.backend import cpu_kernels_enabled
from taskloom.ops.cpu_kernels import call_kernel
from taskloom.ops.cpu_native import load_kernel
from taskloom.ops.int4_linear import INT4_GROUP_SIZE, Int4Linear, Int4Weight

TILE = 16       # weight rows a tile of the layout holds (the kernel's vector lanes)
_P, _I = ctypes.c_void_p, ctypes.c_int64


@lru_cache(maxsize=1)
def library() -> Any:
    """The compiled `csrc/q4_linear.c` with its signatures, or None where it cannot be built
    here or its CPU has no AVX-512 VNNI."""
    lib = load_kernel("q4_linear")
    if lib is None:
        return None
    lib.q4_linear_available.restype = ctypes.c_int
    if not lib.q4_linear_available():
        return None
    lib.q4_linear_bf16.argtypes = [_P, _I, _I, _P, _P, _P, _I, _I, _P, _I]
    lib.q4_linear_bf16.restype = ctypes.c_int
    return lib


def vnni_available() -> bool:
    """Whether 4-bit projections run here by int8 dot products (the kernel builds with AVX-512
    VNNI, and `TASKLOOM_CPU_KERNELS` is not "0")."""
    return cpu_kernels_enabled() and library() is not None


def pack_tiles(w: Int4Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An Int4Weight [n, k] -> the kernel's layout: codes [n, k / 2] uint8 and the scales and
    mins [n, k / 32] as int16 holding fp16 bits (integers, so that a model's `.to(dtype)`
    leaves them be), in tiles of 16 rows (see `csrc/q4_linear.c`)."""
    n, k = w.shape
    groups = k // INT4_GROUP_SIZE
    if n % TILE or k % INT4_GROUP_SIZE:
        raise ValueError(f"the int8-dot 4-bit layout needs rows % {TILE} == 0 and cols % "
                         f"{INT4_GROUP_SIZE} == 0, got [{n}, {k}]")
    c = w.codes.reshape(n // TILE, TILE, groups, 4, 2, 4)       # tile, row, group, t, hi, b
    byte = c[..., 0, :] | (c[..., 1, :] << 4)                    # tile, row, group, t, b
    codes = byte.permute(0, 2, 3, 1, 4).reshape(n, k // 2)       # tile, group, t, row, b
    halves = []
    for part, name in ((w.scales, "scale"), (w.mins, "min")):
        h = part.to(torch.float16)
        if not torch.isfinite(h).all():
            raise ValueError(f"a 4-bit group's {name} is beyond fp16's range (65504)")
        halves.append(h.view(torch.int16).reshape(n // TILE, TILE, groups)
                      .transpose(1, 2).reshape(n, groups))
    return codes.contiguous(), halves[0].contiguous(), halves[1].contiguous()


def unpack_tiles(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> Int4Weight:
    """`pack_tiles`' layout -> the Int4Weight it holds (scales and mins as their fp16 values)."""
    n, half_k = codes.shape
    k, groups = 2 * half_k, scales.shape[1]
    b = codes.reshape(n // TILE, groups, 4, TILE, 4).permute(0, 3, 1, 2, 4)   # tile, row, g, t, b
    q = torch.stack((b & 15, b >> 4), dim=-2).reshape(n, k)      # tile, row, g, t, hi, b

    def values(part: torch.Tensor) -> torch.Tensor:
        return (part.reshape(n // TILE, groups, TILE).transpose(1, 2).reshape(n, groups)
                .view(torch.float16).float())
    return Int4Weight(q.contiguous(), values(scales), values(mins))


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [m, k] -> its 16-bit codes [m, k] (int32) and, per group of 32, their scale [m, k /
    32] and the float32 sum of x: what the kernel computes first (the same codes, bit for bit;
    the sums in another order). A code is 256 hi + lo for two int8 parts, hi = round(x / xs)
    and lo = round(256 (x / xs - hi)) (saturated at 127), xs = amax / 127; the scale xs / 256."""
    m, k = x.shape
    xg = x.float().reshape(m, k // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
    amax = xg.abs().amax(dim=-1)
    # 127 / amax divided as the kernel divides (`127.0 / t` is torch's reciprocal times 127,
    # which rounds differently and moves codes that sit near a half)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0).div(amax), torch.zeros_like(amax))
    t = xg * inv[..., None]
    hi = torch.round(t)
    lo = torch.round((t - hi) * 256).clamp(-128, 127)
    codes = (256 * hi + lo).to(torch.int32).reshape(m, k)
    return codes, amax / 127.0 / 256.0, xg.sum(dim=-1)


def int4_vnni_ref(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    """x [m, k] -> x W^T [m, n] float64 as the kernel computes it: x quantized per group, each
    group's integer dot product times scale * x-scale plus min * the group's sum of x, with
    the scales and mins rounded to fp16 (the kernel's layout)."""
    xq, xs, xsum = quantize_activations(x)
    m, k = x.shape
    n, groups = w.shape[0], k // INT4_GROUP_SIZE
    dots = torch.einsum("ngc,mgc->mng",
                        w.codes.reshape(n, groups, INT4_GROUP_SIZE).double(),
                        xq.reshape(m, groups, INT4_GROUP_SIZE).double())
    s = w.scales.to(torch.float16).double()
    mn = w.mins.to(torch.float16).double()
    return (dots * (s[None] * xs.double()[:, None])).sum(-1) + xsum.double() @ mn.t()


class VnniInt4Linear(Int4Linear):
    """An Int4Linear multiplied by int8 dot products (`csrc/q4_linear.c`): `weight` holds the
    codes in tiles of 16 rows, `scales` and `mins` [out, in / 32] each group's fp16 terms as
    int16 bits. bf16 activations only, on the CPU."""

    def __init__(self, linear: nn.Linear) -> None:
        if library() is None:
            raise RuntimeError("VnniInt4Linear needs the q4_linear C kernel with AVX-512 VNNI, "
                               "which cannot be built for this machine")
        super().__init__(linear)
        if self.out_features % TILE:
            raise ValueError(f"out_features must be a multiple of {TILE}, got "
                             f"{self.out_features}")
        groups = self.in_features // INT4_GROUP_SIZE
        device = linear.weight.device
        for name in ("scales", "mins"):
            param = nn.Parameter(torch.empty(self.out_features, groups, dtype=torch.int16,
                                             device=device), requires_grad=False)
            param.filled_by = "weight"   # llama's check for weights the checkpoint lacked
            setattr(self, name, param)

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            y = self.forward(x.reshape(-1, x.shape[-1]))
            return y.view(*x.shape[:-1], self.out_features)
        if x.dtype != torch.bfloat16 or not x.is_cpu or x.shape[1] != self.in_features:
            raise ValueError(f"a 4-bit projection takes bf16 CPU activations [..., "
                             f"{self.in_features}], got {x.dtype} {tuple(x.shape)} on "
                             f"{x.device}")
        if x.stride(1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features, dtype=torch.bfloat16)
        if rows:
            status = call_kernel(library().q4_linear_bf16, x.data_ptr(), x.stride(0), rows,
                                 self.weight.data_ptr(), self.scales.data_ptr(),
                                 self.mins.data_ptr(), self.out_features, self.in_features,
                                 y.data_ptr(), self.out_features)
            if status == 2:
                raise MemoryError(f"q4_linear could not allocate {rows} rows of quantized "
                                  f"activations")
            assert status == 0, f"q4_linear_bf16 returned {status}"
        if self.bias is not None:
            y.add_(self.bias)
        return y

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in bf16: each `code * scale + min` in float32, rounded once."""
        return unpack_tiles(self.weight, self.scales, self.mins).dequantize().to(torch.bfloat16)

    def _pack(self, w: Int4Weight) -> None:
        for param, part in zip((self.weight, self.scales, self.mins), pack_tiles(w)):
            param.copy_(part)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", int8 dot products"
