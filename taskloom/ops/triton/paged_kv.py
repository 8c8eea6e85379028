"""Building blocks shared by the paged-attention kernels: addressing a sequence's tokens in
the block cache through its block table, one step of the online softmax, a range of a
sequence's keys folded into it, and a split's partial result.

The KV cache of one layer is `[2, num_blocks, block_size, num_kv_heads, head_dim]`; kernels
take its key and value halves as two pointers with the same strides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax runs in base 2: exp(x) == exp2(x * LOG2E)


@dataclass(frozen=True)
class TileConfig:
    """How an attention kernel is launched: keys per tile (`block_n`; None: 64 for head_dim
    up to 128, else 32), warps, and software-pipeline stages (None: Triton's default). Each
    kernel module holds its config in a module variable, read at every launch, so that
    `taskloom bench kernels --sweep` can time others in place."""

    block_n: int | None = None
    num_warps: int = 4
    num_stages: int | None = None

    def keys_per_tile(self, head_dim: int) -> int:
        if self.block_n is not None:
            return self.block_n
        return 64 if head_dim <= 128 else 32

    def launch_options(self) -> dict[str, Any]:
        """The launch's num_warps / num_stages keyword arguments."""
        options: dict[str, Any] = {"num_warps": self.num_warps}
        if self.num_stages is not None:
            options["num_stages"] = self.num_stages
        return options


@triton.jit
def kv_token_offsets(table_ptr, idx, valid, kv_head, stride_block, stride_token, stride_head,
                     BLOCK_SIZE: tl.constexpr):
    """Element offsets (int64) of tokens `idx` [BLOCK_N] of one sequence, for one kv head, in
    a cache half; `table_ptr` points at the sequence's row of the block table."""
    page = tl.load(table_ptr + idx // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    return page * stride_block + (idx % BLOCK_SIZE) * stride_token + kv_head * stride_head


@triton.jit
def load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, idx, valid, kv_head, stride_block,
                 stride_token, stride_head, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Keys and values [BLOCK_N, BLOCK_D] of one sequence's tokens `idx` (those not `valid`
    are not read, and load as 0) for kv head `kv_head`."""
    d = tl.arange(0, BLOCK_D)
    offs = kv_token_offsets(table_ptr, idx, valid, kv_head, stride_block, stride_token,
                            stride_head, BLOCK_SIZE)
    kv_mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    k = tl.load(k_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_cache_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def online_softmax_step(q, k, v, visible, m, l, acc, qk_scale,
                        DOT_PRECISION: tl.constexpr):
    """Fold one tile of keys/values into the running max `m`, sum `l` and output `acc`.

    q: [M, D]; k, v: [N, D]; visible: [M, N] bool; m, l: [M] float32 (base-2 logits);
    acc: [M, D] float32. A row that has seen no visible key yet keeps m == -inf, l == 0.
    """
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))                                   # [M]
    m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)   # -inf - -inf would be NaN
    p = tl.exp2(s - m_ref[:, None])                                       # [M, N]
    alpha = tl.exp2(m - m_ref)                                            # [M]
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l, acc


@triton.jit
def fold_key_range(q, k_cache_ptr, v_cache_ptr, table_ptr, start, end, kv_head, qk_scale,
                   stride_block, stride_token, stride_head, m, l, acc,
                   HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Fold the keys and values at positions [start, end) of the sequence whose block-table
    row `table_ptr` points at into the online softmax (m, l, acc) of queries `q` [M, BLOCK_D]
    (all of kv head `kv_head`); positions outside the range are never read."""
    for n0 in range(start, end, BLOCK_N):
        idx = n0 + tl.arange(0, BLOCK_N)
        valid = idx < end                                                 # [BLOCK_N]
        k, v = load_kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, idx, valid, kv_head,
                            stride_block, stride_token, stride_head, HEAD_DIM, BLOCK_SIZE,
                            BLOCK_D)
        m, l, acc = online_softmax_step(q, k, v, valid[None, :], m, l, acc, qk_scale,
                                        DOT_PRECISION)
    return m, l, acc


@triton.jit
def attend_key_range(q, k_cache_ptr, v_cache_ptr, table_ptr, start, end, kv_head, qk_scale,
                     stride_block, stride_token, stride_head, M: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                     BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Queries `q` [M, BLOCK_D] (all of kv head `kv_head`) against the keys and values at
    positions [start, end) of the sequence whose block-table row `table_ptr` points at: the
    online softmax's running max, sum and output (m, l, acc) after them; l == 0 where the
    range is empty."""
    m = tl.full([M], float("-inf"), tl.float32)
    l = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, BLOCK_D], tl.float32)
    return fold_key_range(q, k_cache_ptr, v_cache_ptr, table_ptr, start, end, kv_head,
                          qk_scale, stride_block, stride_token, stride_head, m, l, acc,
                          HEAD_DIM, BLOCK_SIZE, BLOCK_D, BLOCK_N, DOT_PRECISION)


@triton.jit
def partial_result(m, l, acc):
    """A split's normalised output [M, D] and base-2 log-sum-exp [M] from its (m, l, acc); a
    split that saw no key gives 0 with log-sum-exp -inf (weight 0 in the merge)."""
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    lse = tl.where(l > 0, m + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))
    return out, lse


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact products for float32 data, the tensor-core default
    (which only affects float32) otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def check_paged_inputs(query: torch.Tensor, kv_cache: torch.Tensor) -> None:
    """Raise ValueError unless query [tokens, heads, head_dim] fits the cache's layout."""
    if kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError("kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], "
                         f"got shape {tuple(kv_cache.shape)}")
    num_kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    if query.dim() != 3 or query.shape[2] != head_dim or query.shape[1] % num_kv_heads:
        raise ValueError(
            f"query must be [num_tokens, num_heads, {head_dim}] with num_heads a "
            f"multiple of {num_kv_heads} kv heads, got shape {tuple(query.shape)}")
    if query.dtype != kv_cache.dtype:
        raise ValueError(f"query and kv_cache must share a dtype, got {query.dtype} and "
                         f"{kv_cache.dtype}")
    if query.stride(2) != 1 or kv_cache.stride(4) != 1:
        raise ValueError("query and kv_cache need a contiguous last (head_dim) dimension")
