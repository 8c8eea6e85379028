"""Rotary position embedding (neox / rotate-half style) applied to q and k in one launch, and
the same fused with the KV-cache write: the rotated key and the value go straight to their
slots in the paged cache (what the model runs: one launch a layer instead of two, and the
rotated key is never written anywhere else).

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
def _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache, dtype: tl.constexpr,
             HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The token's cos and sin rows [BLOCK_HALF], rounded to `dtype`, in float32."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    table = cos_sin_ptr + pos * stride_cache
    cos = tl.load(table + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(table + HALF + j, mask=j < HALF, other=0.0).to(dtype).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(
        positions_ptr, cos_sin_ptr, q_ptr, k_ptr, q_out_ptr, k_out_ptr, stride_cache,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_qot, stride_qoh, stride_kot,
        stride_koh, NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache,
                        q_ptr.dtype.element_ty, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh,
                  stride_qoh, cos, sin, NUM_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + token * stride_kt, k_out_ptr + token * stride_kot, stride_kh,
                  stride_koh, cos, sin, NUM_KV_HEADS, HALF, BLOCK_HK, BLOCK_HALF)


def _check_query_key(query: torch.Tensor, key: torch.Tensor) -> None:
    """ValueError unless query and key are [num_tokens, heads, head_dim] with one even
    head_dim, contiguous in it."""
    if (key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]
            or query.shape[2] % 2):
        raise ValueError(f"query and key must be [num_tokens, heads, head_dim] with one even "
                         f"head_dim, got {tuple(query.shape)} and {tuple(key.shape)}")
    if query.stride(2) != 1 or key.stride(2) != 1:
        raise ValueError("query and key need a contiguous last (head_dim) dimension")


def apply_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [num_tokens, num_heads, head_dim] and key [num_tokens, num_kv_heads,
    head_dim] (any token/head strides, contiguous head_dim) by each token's position
    ([num_tokens] int64) using cos_sin_cache [max_position, head_dim] (cos | sin, float32).
    Returns new contiguous tensors of the same shapes and dtypes."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    _check_query_key(query, key)
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


@triton.jit
def _rotary_to_cache_kernel(
        positions_ptr, cos_sin_ptr, q_ptr, k_ptr, v_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
        slot_mapping_ptr, stride_cache, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
        stride_vh, stride_qot, stride_qoh, stride_cb, stride_ct, stride_ch,
        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
        BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _cos_sin(positions_ptr, cos_sin_ptr, token, stride_cache,
                        q_ptr.dtype.element_ty, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr + token * stride_qt, q_out_ptr + token * stride_qot, stride_qh,
                  stride_qoh, cos, sin, NUM_HEADS, HALF, BLOCK_HQ, BLOCK_HALF)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:                # a padding token (CUDA-graph batches): nothing to store
        return
    dst = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    _rotate_heads(k_ptr + token * stride_kt, k_cache_ptr + dst, stride_kh, stride_ch, cos, sin,
                  NUM_KV_HEADS, HALF, BLOCK_HK, BLOCK_HALF)
    h = tl.arange(0, BLOCK_HK)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < 2 * HALF)[None, :]
    v = tl.load(v_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + dst + h[:, None] * stride_ch + d[None, :],
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def apply_rotary_to_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, cos_sin_cache: torch.Tensor,
                          kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """`apply_rotary` then `write_kv_cache` of the rotated key and `value` in one launch:
    the same values in the same places (bit for bit), and tokens whose slot is negative store
    nothing. value: [num_tokens, num_kv_heads, head_dim] (any token/head strides);
    kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim]. Returns the rotated query,
    a new contiguous tensor."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    _, _, block_size, cache_kv_heads, cache_head_dim = kv_cache.shape
    _check_query_key(query, key)
    if value.shape != key.shape or (cache_kv_heads, cache_head_dim) != (num_kv_heads, head_dim):
        raise ValueError(f"value and the cache's [.., {cache_kv_heads}, {cache_head_dim}] must "
                         f"match key {tuple(key.shape)}, got value {tuple(value.shape)}")
    if value.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("value and kv_cache need a contiguous last (head_dim) dimension")
    q_out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return q_out
    cache = cos_sin_cache.contiguous()                   # [max_position, head_dim]
    k_cache, v_cache = kv_cache[0], kv_cache[1]          # [num_blocks, block_size, kv_heads, d]
    _rotary_to_cache_kernel[(num_tokens,)](
        positions, cache, query, key, value, q_out, k_cache, v_cache, slot_mapping,
        cache.stride(0), query.stride(0), query.stride(1), key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), q_out.stride(0), q_out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), NUM_HEADS=num_heads,
        NUM_KV_HEADS=num_kv_heads, HALF=head_dim // 2, BLOCK_SIZE=block_size,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(head_dim // 2),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
    return q_out
