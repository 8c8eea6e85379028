"""Fused RMSNorm and residual-add + RMSNorm (Triton), one program per row.

The cast points are those of `taskloom.ops.rmsnorm`: the residual sum is rounded to its dtype,
the norm is computed in float32, the normalised value is rounded to the input dtype and only
then multiplied by the weight (the product rounded to the promoted dtype, as torch does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
        x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, eps, stride_x, stride_r,
        stride_o, stride_ro, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
        ADD_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)      # [BLOCK]
    if ADD_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, 0) / HIDDEN
    normed = (h * tl.rsqrt(variance + eps)).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`weight * x / sqrt(mean(x**2) + eps)` over the last dimension.

    x: [..., hidden]; weight: [hidden]; returns [..., hidden] in the promoted dtype of x and
    weight (x's dtype in a model).
    """
    rows = _rows(x, weight)                              # [num_rows, hidden]
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    _launch(rows, None, weight, out, None, eps)
    return out.view(x.shape)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns `(rms_norm(x + residual), x + residual)` for x, residual: [..., hidden]."""
    if x.shape != residual.shape:
        raise ValueError(
            f"x and residual must have the same shape, got {tuple(x.shape)} and "
            f"{tuple(residual.shape)}")
    rows, res_rows = _rows(x, weight), _rows(residual, weight)  # [num_rows, hidden]
    sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    new_residual = torch.empty(rows.shape, dtype=sum_dtype, device=x.device)
    out = torch.empty(rows.shape, dtype=torch.promote_types(sum_dtype, weight.dtype),
                      device=x.device)
    _launch(rows, res_rows, weight, out, new_residual, eps)
    return out.view(x.shape), new_residual.view(x.shape)


def _rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x as [num_rows, hidden] with a contiguous last dimension (a copy only if needed)."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"weight must be [hidden] with hidden = x.shape[-1] = {x.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    rows = x.reshape(-1, x.shape[-1])                    # [num_rows, hidden]
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
            out: torch.Tensor, residual_out: torch.Tensor | None, eps: float) -> None:
    num_rows, hidden = x.shape
    if num_rows == 0:
        return
    block = triton.next_power_of_2(hidden)
    res_stride = 0 if residual is None else residual.stride(0)
    res_out_stride = 0 if residual_out is None else residual_out.stride(0)
    _rms_norm_kernel[(num_rows,)](
        x, residual, weight.contiguous(), out, residual_out, eps, x.stride(0), res_stride,
        out.stride(0), res_out_stride, HIDDEN=hidden, BLOCK=block,
        ADD_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 512)))
