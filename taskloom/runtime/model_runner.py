"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model and samples.

It owns the KV-cache tensors (one `[2, num_blocks, block_size, num_kv_heads, head_dim]` per
layer) and the per-request sampling state, which lives from a request's first step until the
scheduler reports it finished (so a preempted request keeps its seeded generator).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from taskloom.engine.outputs import RunnerOutput, SchedulerOutput, ScheduledSeq
from taskloom.models.arch import ArchConfig
from taskloom.runtime.attention import AttentionMetadata
from taskloom.runtime.sampler import Sampler, compute_prompt_logprobs

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _TORCH_DTYPES[name]


@dataclass
class _ReqState:
    prompt_token_ids: list[int]
    logprobs: int | None
    prompt_logprobs: int | None


@dataclass
class _Batch:
    input_ids: torch.Tensor       # [num_tokens]
    positions: torch.Tensor       # [num_tokens]
    meta: AttentionMetadata
    sample_rows: list[int]        # flat index of each sampled token
    sample_seqs: list[ScheduledSeq]


class ModelRunner:
    """Executes scheduled steps on one device."""

    def __init__(self, model: nn.Module, arch: ArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_ids: tuple[int, ...]) -> None:
        self.model = model
        self.arch = arch
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device)
                          for _ in range(arch.num_hidden_layers)]
        self.sampler = Sampler(arch.vocab_size, device)
        self._states: dict[str, _ReqState] = {}

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return RunnerOutput()
        batch = self._prepare(sched.seqs)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        out = RunnerOutput()
        if batch.sample_rows:
            self._sample(hidden, batch, out)
        self._prompt_logprobs(hidden, batch, sched.seqs, out)
        return out

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            self._states.pop(rid, None)
            self.sampler.remove_request(rid)
        for new in sched.new_requests:
            p = new.params
            self._states[new.req_id] = _ReqState(new.prompt_token_ids, p.logprobs,
                                                 p.prompt_logprobs)
            stop_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos_token_ids)
            self.sampler.add_request(new.req_id, p, new.prompt_token_ids, stop_ids)

    def _prepare(self, seqs: list[ScheduledSeq]) -> _Batch:
        """Flatten the scheduled sequences into one unpadded batch and its metadata."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSeq] = []
        for seq in seqs:
            start, n = seq.num_computed_tokens, len(seq.token_ids)
            input_ids.extend(seq.token_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            table = seq.block_ids
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if seq.sample:
                sample_rows.append(qsl[-1] - 1)
                sample_seqs.append(seq)
        max_blocks = max(len(s.block_ids) for s in seqs)
        tables = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens,
            max_query_len=max(b - a for a, b in zip(qsl, qsl[1:])),
            max_seq_len=max(seq_lens), block_size=bs)
        return _Batch(torch.tensor(input_ids, dtype=torch.int64, device=dev),
                      torch.tensor(positions, dtype=torch.int64, device=dev),
                      meta, sample_rows, sample_seqs)

    def _sample(self, hidden: torch.Tensor, batch: _Batch, out: RunnerOutput) -> None:
        rows = torch.tensor(batch.sample_rows, device=self.device)
        logits = self.model.compute_logits(hidden[rows])          # [num_sampled, vocab]
        req_ids = [s.req_id for s in batch.sample_seqs]
        result = self.sampler(logits, req_ids, [s.output_token_ids for s in batch.sample_seqs])
        tokens = result.sampled.tolist()
        for i, rid in enumerate(req_ids):
            out.sampled[rid] = tokens[i]
            k = self._states[rid].logprobs
            if k is not None and result.logprobs is not None:
                out.logprobs[rid] = result.logprobs.to_list(i, k)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: _Batch, seqs: list[ScheduledSeq],
                         out: RunnerOutput) -> None:
        """Score prompt tokens 1..P-1 from the hidden states of positions 0..P-2 in this chunk."""
        qsl = batch.meta.query_start_loc_cpu
        for i, seq in enumerate(seqs):
            state = self._states[seq.req_id]
            k = state.prompt_logprobs
            start = seq.num_computed_tokens
            end = min(start + len(seq.token_ids), seq.num_prompt_tokens - 1)
            if k is None or end <= start:
                continue
            rows = torch.arange(qsl[i], qsl[i] + end - start, device=self.device)
            logits = self.model.compute_logits(hidden[rows])      # [end - start, vocab]
            targets = torch.tensor(state.prompt_token_ids[start + 1:end + 1], device=self.device)
            lp = compute_prompt_logprobs(logits, targets, k)
            out.prompt_logprobs[seq.req_id] = (start + 1, [lp.to_list(j, k)
                                                           for j in range(end - start)])

