"""Write this step's keys and values into the paged KV cache (Triton).

Same semantics as `taskloom.ops.attention.write_kv_cache`, except that tokens whose slot is
negative are skipped: padding tokens (CUDA-graph batches) write nowhere.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _write_kv_kernel(
        key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, stride_kt, stride_kh,
        stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
        NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]
    dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
           + h[:, None] * stride_ch + d[None, :])                         # [BLOCK_H, BLOCK_D]
    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Store each token's key and value at its slot (block_id * block_size + offset).

    key, value: [num_tokens, num_kv_heads, head_dim] (any token/head strides, contiguous
    head_dim); kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim];
    slot_mapping: [num_tokens] int64, negative for tokens to skip.
    """
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    if key.shape != value.shape or tuple(key.shape[1:]) != (num_kv_heads, head_dim):
        raise ValueError(f"key and value must be [num_tokens, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key.stride(2) != 1 or value.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("key, value and kv_cache need a contiguous last (head_dim) dimension")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    k_cache, v_cache = kv_cache[0], kv_cache[1]          # [num_blocks, block_size, kv_heads, d]
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
