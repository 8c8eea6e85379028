"""SnapKV: compress a prompt's KV cache to the positions its last tokens attend to most.

Once a layer has attended the chunk that ends a prompt of L tokens, `snapkv_compress` takes
the queries of the prompt's last `window_size` tokens (the observation window: in most
prompts the instruction or question) and their attention over the prompt, causal and
softmaxed as the model's own, in float32. For each KV head it sums that attention over the
window and averages it over the head's query heads (GQA), smooths the votes over positions
with a pooling of `kernel_size` (so a chosen position's neighbours come along: SnapKV's
clustering), and keeps the `budget - window_size` positions with the most votes, ties to
the earlier, in order, then the window itself. Each head keeps its own positions. The kept
keys (already rotated at their true positions) and values are written to `dest_slots`, the
cache slots of positions `L - budget .. L - 1` in blocks of their own (see
`taskloom.engine.kv_cache`): later tokens attend to them as a context of `budget` entries.

It runs once per compressed prompt and layer, in torch on every device: a matrix of
`window_size x L` scores per query head, small beside the prefill that precedes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SnapKVPlan:
    """One prompt's compression in a step, built once by the runner for every layer."""

    query_rows: torch.Tensor   # [window_size] rows of the flat batch: the window's queries
    src_slots: torch.Tensor    # [L] int64 cache slots of the prompt's positions 0 .. L - 1
    dest_slots: torch.Tensor   # [budget] int64 cache slots the kept entries go to, in order
    kernel_size: int
    pooling: str               # "avg" or "max"

    @property
    def window_size(self) -> int:
        return self.query_rows.shape[0]


def snapkv_scores(query: torch.Tensor, keys: torch.Tensor, scale: float,
                  kernel_size: int, pooling: str) -> torch.Tensor:
    """The pooled votes [num_kv_heads, L - w] of a prompt's positions before its window.

    query: [w, num_heads, head_dim], the window's queries (positions L - w .. L - 1);
    keys: [L, num_kv_heads, head_dim], the prompt's keys."""
    w, num_heads, head_dim = query.shape
    n, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = query.float().view(w, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)  # [kvh, g, w, d]
    k = keys.float().permute(1, 2, 0)                                 # [kvh, d, L]
    scores = torch.matmul(q, k[:, None]) * scale                      # [kvh, g, w, L]
    q_pos = torch.arange(n - w, n, device=keys.device)[:, None]       # [w, 1]
    scores.masked_fill_(torch.arange(n, device=keys.device)[None, :] > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    votes = probs[..., :n - w].sum(dim=2).mean(dim=1)                 # [kvh, L - w]
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(votes[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]


def snapkv_select(votes: torch.Tensor, keep: int) -> torch.Tensor:
    """Each KV head's `keep` positions with the most votes (ties: the earlier), ascending:
    [num_kv_heads, keep] int64."""
    order = torch.sort(votes, dim=-1, descending=True, stable=True).indices[:, :keep]
    return order.sort(dim=-1).values


def snapkv_compress(query: torch.Tensor, kv_cache: torch.Tensor, plan: SnapKVPlan,
                    scale: float) -> None:
    """Write the entries SnapKV keeps of one prompt's KV to `plan.dest_slots`.

    query: [num_tokens, num_heads, head_dim], the step's (rotated) queries; kv_cache: one
    layer's `[2, num_blocks, block_size, num_kv_heads, head_dim]`, holding the whole prompt
    (this step's chunk included) at `plan.src_slots`."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    w = plan.window_size
    keep = plan.dest_slots.shape[0] - w
    keys = flat[0].index_select(0, plan.src_slots)                    # [L, kvh, d]
    values = flat[1].index_select(0, plan.src_slots)
    votes = snapkv_scores(query.index_select(0, plan.query_rows), keys, scale,
                          plan.kernel_size, plan.pooling)
    idx = snapkv_select(votes, keep)                                  # [kvh, keep]
    heads = torch.arange(num_kv_heads, device=idx.device)[:, None]    # [kvh, 1]
    for cache, src in ((flat[0], keys), (flat[1], values)):
        kept = torch.cat([src[idx, heads].transpose(0, 1), src[-w:]])  # [budget, kvh, d]
        cache.index_copy_(0, plan.dest_slots, kept)
