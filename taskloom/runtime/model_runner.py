"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model and samples.

It owns the KV-cache tensors (one `[2, num_blocks, block_size, num_kv_heads, head_dim]` per
layer) and the per-request sampling state, which lives from a request's first step until the
scheduler reports it finished (so a preempted request keeps its seeded generator). On CUDA,
decode-only steps replay CUDA graphs captured at startup (`taskloom.runtime.cuda_graphs`);
other steps, and every step on the CPU, run the model eagerly. With LoRA adapters
(`taskloom.lora.manager`), the batch's adapters are put in device slots before each forward.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from taskloom.engine.outputs import RunnerOutput, SchedulerOutput, ScheduledSeq
from taskloom.lora.manager import LoRAManager
from taskloom.lora.request import LoRARequest
from taskloom.models.arch import ArchConfig
from taskloom.runtime.attention import AttentionMetadata
from taskloom.runtime.cuda_graphs import DecodeGraphs
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
    lora: LoRARequest | None = None


@dataclass
class _Batch:
    """One step flattened on the host: the lists the batch tensors are made from."""

    input_ids: list[int]          # [num_tokens]
    positions: list[int]          # [num_tokens]
    slots: list[int]              # [num_tokens] block_id * block_size + offset
    query_start_loc: list[int]    # [num_seqs + 1]
    seq_lens: list[int]           # [num_seqs]
    block_tables: list[list[int]]  # [num_seqs][max_blocks], padded with 0
    sample_rows: list[int]        # flat index of each sampled token
    sample_seqs: list[ScheduledSeq]
    seq_loras: list[LoRARequest | None]  # [num_seqs]

    @property
    def max_query_len(self) -> int:
        qsl = self.query_start_loc
        return max(b - a for a, b in zip(qsl, qsl[1:]))


class ModelRunner:
    """Executes scheduled steps on one device.

    With `graph_sizes` (CUDA only), decode-only steps of up to the largest size replay CUDA
    graphs captured here, once the KV cache is allocated; `max_model_len` (the longest
    sequence) bounds their block tables and fixes their decode-attention splits.
    """

    def __init__(self, model: nn.Module, arch: ArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_ids: tuple[int, ...],
                 max_model_len: int, graph_sizes: Sequence[int] = (),
                 lora: LoRAManager | None = None) -> None:
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
        self.lora = lora
        self.prepare_s = 0.0    # host time in `_prepare`, summed (see engine.core.StepTimes)
        self.graphs: DecodeGraphs | None = None
        if graph_sizes:
            if device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
            self.graphs = DecodeGraphs(model, self.kv_caches, graph_sizes, arch.hidden_size,
                                       block_size, max_model_len,
                                       None if lora is None else lora.state)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self._update_states(sched)
        if sched.is_empty:
            return RunnerOutput()
        t0 = time.perf_counter()
        batch = self._prepare(sched.seqs)
        self.prepare_s += time.perf_counter() - t0
        hidden = self._forward(batch)                            # [num_tokens, hidden]
        out = RunnerOutput()
        if batch.sample_rows:
            self._sample(hidden, batch, out)
        self._prompt_logprobs(hidden, batch, sched.seqs, out)
        return out

    def add_lora(self, lora: LoRARequest) -> None:
        """Load an adapter into the host cache now (ValueError if it does not fit)."""
        if self.lora is None:
            raise ValueError("this runner was built without LoRA support")
        self.lora.add(lora)

    def load_loras(self, loras: list[LoRARequest]) -> dict[int, str]:
        """Ready a step's adapters before it runs: those that could not be loaded, by id, with
        why (their requests must leave the step)."""
        if self.lora is None:
            return {lora.lora_id: "this runner was built without LoRA support" for lora in loras}
        return self.lora.prepare(loras)

    def remove_lora(self, lora_id: int) -> None:
        if self.lora is not None:
            self.lora.remove(lora_id)

    def _update_states(self, sched: SchedulerOutput) -> None:
        for rid in sched.finished_req_ids:
            self._states.pop(rid, None)
            self.sampler.remove_request(rid)
        for new in sched.new_requests:
            p = new.params
            self._states[new.req_id] = _ReqState(new.prompt_token_ids, p.logprobs,
                                                 p.prompt_logprobs, new.lora)
            stop_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos_token_ids)
            self.sampler.add_request(new.req_id, p, new.prompt_token_ids, stop_ids)

    def _prepare(self, seqs: list[ScheduledSeq]) -> _Batch:
        """Flatten the scheduled sequences into one unpadded batch (host lists)."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_seqs: list[ScheduledSeq] = []
        for seq in seqs:
            start, n, table = seq.num_computed_tokens, len(seq.token_ids), seq.block_ids
            if n == 1:      # a decode: most sequences of most steps
                input_ids.append(seq.token_ids[0])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
            else:
                input_ids.extend(seq.token_ids)
                pos = range(start, start + n)
                positions.extend(pos)
                slots.extend(table[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
            if seq.sample:
                sample_rows.append(qsl[-1] - 1)
                sample_seqs.append(seq)
        max_blocks = max(len(s.block_ids) for s in seqs)
        tables = [s.block_ids + [0] * (max_blocks - len(s.block_ids)) for s in seqs]
        loras = [self._states[s.req_id].lora for s in seqs]
        return _Batch(input_ids, positions, slots, qsl, seq_lens, tables, sample_rows,
                      sample_seqs, loras)

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the batch: a CUDA graph replay for a decode
        step that one fits, else an eager forward over the unpadded batch."""
        lora_slots = None if self.lora is None else self.lora.assign_slots(batch.seq_loras)
        graphs = self.graphs
        if graphs is not None and batch.max_query_len == 1 and graphs.fits(len(batch.seq_lens)):
            return graphs.run(batch.input_ids, batch.positions, batch.slots, batch.seq_lens,
                              batch.block_tables, lora_slots)
        if self.lora is not None and lora_slots is not None:
            qsl = batch.query_start_loc
            self.lora.set_step(lora_slots, [b - a for a, b in zip(qsl, qsl[1:])])
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(batch.slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(batch.query_start_loc, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(batch.seq_lens, dtype=torch.int32, device=dev),
            # numpy reads nested lists 2-3x faster than torch.tensor does
            block_tables=torch.from_numpy(np.array(batch.block_tables, dtype=np.int32)).to(dev),
            query_start_loc_cpu=batch.query_start_loc, seq_lens_cpu=batch.seq_lens,
            max_query_len=batch.max_query_len, max_seq_len=max(batch.seq_lens),
            block_size=self.block_size)
        input_ids = torch.tensor(batch.input_ids, dtype=torch.int64, device=dev)
        positions = torch.tensor(batch.positions, dtype=torch.int64, device=dev)
        return self.model(input_ids, positions, self.kv_caches, meta)

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
        qsl = batch.query_start_loc
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

