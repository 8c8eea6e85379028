"""Rotary position embedding (neox / rotate-half style) applied to q and k in one launch.

As in `taskloom.ops.rotary.apply_rotary`, cos/sin are looked up by position in the float32
table and rounded to the query dtype. The rotation itself is computed in float32 and rounded
once, where the reference rounds each product and each sum: results may differ from it by one
rounding of the dtype. (Asking for the reference's roundings does not help: the compiler folds
them into fused multiply-adds.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, out_ptr, stride_h, stride_oh, cos, sin, NUM_HEADS: tl.constexpr,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate all heads of one token: x_ptr/out_ptr point at the token's first head."""
    h = tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    mask = (h < NUM_HEADS)[:, None] & (j < HALF)[None, :]
    offs = h[:, None] * stride_h + j[None, :]                             # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    c, s = cos[None, :], sin[None, :]                                     # [1, BLOCK_HALF]
    o1 = x1 * c - x2 * s
    o2 = x2 * c + x1 * s
    out_offs = h[:, None] * stride_oh + j[None, :]
    tl.store(out_ptr + out_offs, o1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + out_offs + HALF, o2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
        positions_ptr, cos_sin_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, stride_cache,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot,
        stride_koh, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    table = cos_sin_ptr + pos * stride_cache
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(table + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(table + HALF + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh,
                  stride_qoh, cos, sin, NUM_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, stride_kh,
                  stride_koh, cos, sin, NUM_KV_HEADS, HALF, BLOCK_HK, BLOCK_HALF)


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads,
    head_dim] (any token/head strides, contiguous head_dim) by each token's position
    ([num_tokens] int64) using cos_sin_cache [max_position, head_dim] (cos | sin, float32).
    Returns new contiguous tensors of the same shapes and dtypes."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    if key.shape[0] != num_tokens or key.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"query and key must be [num_tokens, heads, head_dim] with one even "
                         f"head_dim, got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.stride(2) != 1 or key.stride(2) != 1:
        raise ValueError("query and key need a contiguous last (head_dim) dimension")
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    k_out = torch.empty(key.shape, dtype=key.dtype, device=key.device)
    if num_tokens == 0:
        return q_out, k_out
    cache = cos_sin_cache.contiguous()                   # [max_position, head_dim]
    _rotary_kernel[(num_tokens,)](
        positions, cache, query, key, q_out, k_out, cache.stride(0), query.stride(0),
        query.stride(1), key.stride(0), key.stride(1), q_out.stride(0), q_out.stride(1),
        k_out.stride(0), k_out.stride(1), NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads,
        HALF=head_dim // 2, BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2), num_warps=4)
    return q_out, k_out
