"""Gated SiLU for Llama-family MLPs (Triton): `silu(gate) * up` from the fused `[gate | up]`.

Rounds where the torch reference does: the SiLU is computed in float32 and rounded to the
input dtype, then the product is rounded again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, INTER: tl.constexpr,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)  # [BLOCK]
    up = tl.load(x_ptr + row * stride_x + INTER + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """`silu(x[..., :I]) * x[..., I:]` for x: [..., 2*I]; returns [..., I]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension [.., 2*I], got {x.shape[-1]}")
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, x.shape[-1])                    # [num_rows, 2 * inter]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape[0], inter, dtype=x.dtype, device=x.device)  # [num_rows, I]
    if rows.shape[0] and inter:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, BLOCK))](
            rows, out, rows.stride(0), out.stride(0), INTER=inter, BLOCK=BLOCK, num_warps=4)
    return out.view(*x.shape[:-1], inter)
