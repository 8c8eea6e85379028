"""Sizing the KV-cache pool on a GPU: measure what everything else needs at its peak, and give
the pool the rest of the memory budget.

Before the pool exists, a profiling step runs the largest step the scheduler can hand out: a
prefill of `max_num_batched_tokens` tokens (one sequence, or several of at most `max_model_len`
tokens) through the model on a throwaway cache of one layer's size shared by every layer, then
logits and the sampler with every filter, penalty and logprobs on, for `max_num_seqs` rows.
Its peak allocation (weights and anything else live included), plus what the process and
others hold outside torch's allocator (CUDA context, other processes), plus a reserve for the
CUDA graphs captured afterwards, is what the pool leaves free:

    kv_bytes = gpu_memory_utilization * total - peak - non_torch - graph_reserve
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from taskloom.config import SchedulerConfig
from taskloom.models.arch import ArchConfig
from taskloom.runtime.attention import AttentionMetadata
from taskloom.runtime.sampler import Sampler
from taskloom.sampling_params import MAX_LOGPROBS, SamplingParams

logger = logging.getLogger(__name__)

# Per captured graph, beyond the activations of the shared pool (checked by the capture log).
GRAPH_OVERHEAD_BYTES = 4 * 2**20
_PROFILE_PARAMS = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.05,
                                 repetition_penalty=1.1, presence_penalty=0.5,
                                 frequency_penalty=0.5, logprobs=MAX_LOGPROBS)


@dataclass(frozen=True)
class MemoryProfile:
    """What the profiling step measured, in bytes."""

    total: int          # the device's memory
    baseline: int       # allocated before the step: the weights and anything else live
    peak: int           # peak allocated during the step, baseline included
    non_torch: int      # held outside torch's allocator: CUDA context, other processes
    num_tokens: int     # tokens the step ran


def kv_cache_bytes(profile: MemoryProfile, gpu_memory_utilization: float,
                   graph_sizes: Sequence[int]) -> int:
    """Bytes left for the KV pool; ValueError, naming what took the memory, if none are.

    The graph reserve is the profiled activations scaled to the largest graph's tokens (all
    graphs share one pool) plus `GRAPH_OVERHEAD_BYTES` per graph.
    """
    reserve = 0
    if graph_sizes:
        activations = profile.peak - profile.baseline
        reserve = (activations * max(graph_sizes) // profile.num_tokens
                   + GRAPH_OVERHEAD_BYTES * len(graph_sizes))
    budget = int(gpu_memory_utilization * profile.total)
    kv = budget - profile.peak - profile.non_torch - reserve
    gib = 2**30
    summary = (f"gpu_memory_utilization {gpu_memory_utilization} of {profile.total / gib:.2f} "
               f"GiB is {budget / gib:.2f} GiB; the weights and other live tensors take "
               f"{profile.baseline / gib:.2f} GiB, a step of {profile.num_tokens} tokens peaks "
               f"{(profile.peak - profile.baseline) / gib:.2f} GiB above that, memory outside "
               f"torch (CUDA context, other processes) {profile.non_torch / gib:.2f} GiB and "
               f"the CUDA-graph reserve {reserve / gib:.2f} GiB")
    if kv <= 0:
        raise ValueError(f"no GPU memory is left for the KV cache: {summary}. Raise "
                         f"gpu_memory_utilization, lower max_num_batched_tokens or "
                         f"max_num_seqs, or set num_blocks")
    logger.info("KV cache budget %.2f GiB: %s", kv / gib, summary)
    return kv


@torch.inference_mode()
def profile_memory(model: nn.Module, arch: ArchConfig, sched: SchedulerConfig,
                   max_model_len: int, block_size: int, device: torch.device) -> MemoryProfile:
    """Run the profiling step on `device` (CUDA) and measure its peak; see the module doc."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    num_tokens = sched.max_num_batched_tokens
    hidden = _profile_forward(model, arch, _profile_seq_lens(num_tokens, max_model_len),
                              block_size, device)            # [num_tokens, hidden]
    _profile_sampler(model, arch.vocab_size, hidden[:min(sched.max_num_seqs, num_tokens)])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    non_torch = total - free - torch.cuda.memory_reserved(device)
    del hidden
    torch.cuda.empty_cache()
    return MemoryProfile(total=total, baseline=baseline, peak=peak, non_torch=non_torch,
                         num_tokens=num_tokens)


def _profile_seq_lens(num_tokens: int, max_model_len: int) -> list[int]:
    """`num_tokens` split into as few sequences as the context length allows."""
    full, rest = divmod(num_tokens, max_model_len)
    return [max_model_len] * full + ([rest] if rest else [])


def _profile_forward(model: nn.Module, arch: ArchConfig, seq_lens: list[int], block_size: int,
                     device: torch.device) -> torch.Tensor:
    """Prefill sequences of `seq_lens` tokens in one step; every layer and sequence shares
    one cache whose block table is the identity, so slot == position."""
    num_blocks = -(-max(seq_lens) // block_size)
    cache = torch.zeros(2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim,
                        dtype=next(model.parameters()).dtype, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens])  # [num_tokens]
    qsl = [0]
    for n in seq_lens:
        qsl.append(qsl[-1] + n)
    meta = AttentionMetadata(
        slot_mapping=positions,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device).repeat(
            len(seq_lens), 1),                               # [num_seqs, num_blocks]
        query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens, max_query_len=max(seq_lens),
        max_seq_len=max(seq_lens), block_size=block_size)
    input_ids = torch.zeros_like(positions)                  # [num_tokens]
    return model(input_ids, positions, [cache] * arch.num_hidden_layers, meta)


def _profile_sampler(model: nn.Module, vocab_size: int, hidden: torch.Tensor) -> None:
    """Logits and one sampling step for each row of `hidden` [rows, hidden], every sampling
    feature on."""
    logits = model.compute_logits(hidden)                    # [rows, vocab]
    sampler = Sampler(vocab_size, hidden.device)
    req_ids = [f"profile-{i}" for i in range(hidden.shape[0])]
    for rid in req_ids:
        sampler.add_request(rid, _PROFILE_PARAMS, [0], ())
    sampler(logits, req_ids, [[0] for _ in req_ids])
