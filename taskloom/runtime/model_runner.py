"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model and samples.

It owns the KV-cache tensors (one `[2, num_blocks, block_size, num_kv_heads, head_dim]` per
layer) and the per-request sampling state, which lives from a request's first step until the
scheduler reports it finished (a preempted request keeps it). On CUDA,
decode-only steps replay CUDA graphs captured at startup (`taskloom.runtime.cuda_graphs`); on
the CPU with the C kernels, small decode-only steps replay their calls as recorded at the
step's batch size (`taskloom.runtime.cpu_graphs`); other steps run the model eagerly. With
LoRA adapters (`taskloom.lora.manager`), the batch's adapters are put in device slots before
each forward.

`submit` queues a step's work and returns at once with a `PendingStep`; its `result()` waits
for the sampled tokens. Nothing in between waits for the device (host-to-device copies go
through pinned memory, see `taskloom.runtime.transfer`), so the engine can schedule and submit
the next step while this one runs (async scheduling). The next step's inputs may then hold
placeholders for tokens this one samples: the runner fills them on the device from this
step's sampled-token tensor.

The runner also finds the step's decodes that share cached prefix blocks
(`taskloom.runtime.shared_prefix`) and names them in the attention metadata, so that each
group attends to its prefix together; a decode step whose groups save enough KV reads runs
eagerly for that instead of replaying its graph.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from taskloom.config import AttentionWindow, SnapKVConfig
from taskloom.engine.draft_tree import TokenTree, accepted_path, depths, is_chain
from taskloom.engine.outputs import (PLACEHOLDER_TOKEN_ID, Logprobs, RunnerOutput,
                                     SchedulerOutput, ScheduledSeq)
from taskloom.lora.manager import LoRAManager
from taskloom.lora.request import LoRARequest
from taskloom.models.arch import ArchConfig
from taskloom.models.draft_heads import DraftHeads
from taskloom.ops.kv_compress import SnapKVPlan
from taskloom.runtime.attention import (MAX_DECODE_TREE_NODES, AttentionMetadata, Workspace,
                                        set_tree_masks, tree_bits)
from taskloom.runtime.block_tables import BlockTables
from taskloom.runtime.cpu_graphs import CpuDecodeGraphs
from taskloom.runtime.cuda_graphs import DecodeGraphs
from taskloom.runtime.sampler import (LogprobsTensors, Sampler, apply_token_bitmask,
                                      compute_prompt_logprobs)
from taskloom.runtime.shared_prefix import (PrefixGroup, may_share, saved_token_reads,
                                            shared_prefix_groups)
from taskloom.runtime.transfer import to_device, to_host

logger = logging.getLogger(__name__)

@dataclass
class _ReqState:
    prompt_token_ids: list[int]
    logprobs: int | None
    prompt_logprobs: int | None
    lora: LoRARequest | None = None
    # sampling reads the output so far (penalties, min_tokens): a draft position's row gets
    # the drafts before it in its history
    needs_history: bool = False


@dataclass
class _Drafted:
    """A sequence whose step carries drafts: its sampled rows are `first`, then one per
    draft; `parents` () for a chain, else the draft tree's (taskloom.engine.draft_tree)."""

    req_id: str
    first: int
    draft: Sequence[int]
    parents: Sequence[int] = ()

    @property
    def tree(self) -> Sequence[int]:
        """The drafts' parents, a chain's included."""
        return self.parents or range(len(self.draft))

    def kept(self, sampled: Sequence[int]) -> list[int]:
        """The drafts the model agreed with (their indexes, root to leaf), given its
        sampled tokens from row `first` on."""
        return accepted_path(self.tree, self.draft,
                             sampled[self.first:self.first + len(self.draft) + 1])


class _Kept(NamedTuple):
    """Which nodes of each drafted sequence's drafts the model kept (`_kept_nodes`)."""

    nodes: torch.Tensor     # [R, 1 + W] bool: the root, then each draft (batch.drafts order)
    depth: np.ndarray       # [R, 1 + W] int64: each node's depth
    depth_t: torch.Tensor   # the same on the device
    ends: torch.Tensor      # [R]: the deepest kept node, whose row sampled the token after it


@dataclass
class _Batch:
    """One step flattened on the host: the arrays the batch tensors are made from."""

    input_ids: np.ndarray         # [num_tokens] int64
    positions: np.ndarray         # [num_tokens] int64
    slots: np.ndarray             # [num_tokens] int64: block_id * block_size + offset
    query_start_loc: list[int]    # [num_seqs + 1]
    seq_lens: np.ndarray          # [num_seqs] int64
    block_tables: np.ndarray      # [num_seqs, max_blocks] int32, padded with 0
    sample_rows: np.ndarray       # [num_sampled] int64: flat index of each sampled token
    sample_seqs: list[ScheduledSeq]   # the sequence of each sampled row (drafts: several)
    sample_index: list[int]       # [num_sampled]: the output token number each row samples
    drafts: list[_Drafted]        # the drafted sequences' sampled rows and drafts
    seq_loras: list[LoRARequest | None] | None  # [num_seqs]; None: no adapters served
    # (flat index, row of the previous step's sampled tokens) of each placeholder input
    placeholders: list[tuple[int, int]]
    max_query_len: int
    has_bitmasks: bool = False    # structured outputs: some sampled row has a mask
    # SnapKV: where each attention sequence's KV starts (None: all at 0), and the prompts
    # the step compresses: (window's query rows, prompt's slots, kept entries' slots)
    kv_starts: np.ndarray | None = None
    compressions: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    # token trees attended by their masks: (sequence, its draft nodes' parents) of each
    # sequence drafting a tree; None without, or where they are split into decodes
    trees: list[tuple[int, Sequence[int]]] | None = None
    # token trees split into decodes: (tree_lo, tree_bits) [2, num_seqs] of the attention
    # sequences (AttentionMetadata.decode_tree_lo); None without
    tree_rows: np.ndarray | None = None

    @property
    def query_lens(self) -> list[int]:
        qsl = self.query_start_loc
        return [b - a for a, b in zip(qsl, qsl[1:])]


def _draft_rows(seqs: list[ScheduledSeq], sampled: list[int], qsl: list[int]
                ) -> tuple[list[int], list[ScheduledSeq], list[int], list[_Drafted]]:
    """The sampled rows when some sequences carry drafts: such a sequence samples at its
    newest token and at each draft. Returns the rows (flat token indexes), the sequence and
    the output token number of each (a tree node's: its depth's), and the drafted
    sequences."""
    rows: list[int] = []
    row_seqs: list[ScheduledSeq] = []
    index: list[int] = []
    drafts: list[_Drafted] = []
    for i in sampled:
        seq = seqs[i]
        draft = seq.draft_token_ids
        k = len(draft)
        parents = seq.draft_parents if k and not is_chain(seq.draft_parents) else ()
        if k:
            drafts.append(_Drafted(seq.req_id, len(rows), draft, parents))
        rows += range(qsl[i + 1] - 1 - k, qsl[i + 1])
        row_seqs += [seq] * (k + 1)
        first = seq.num_computed_tokens + len(seq.token_ids) - k - seq.num_prompt_tokens
        index += ([first + d for d in depths(tuple(parents))] if parents
                  else range(first, first + k + 1))
    return rows, row_seqs, index, drafts


def _row_bitmasks(row_seqs: list[ScheduledSeq]) -> list[tuple[int, bytes]]:
    """(row, mask) of every sampled row whose sequence has a structured output's masks: a
    drafted sequence's rows (consecutive) take its masks in order, one a position."""
    out: list[tuple[int, bytes]] = []
    prev: ScheduledSeq | None = None
    j = 0
    for r, seq in enumerate(row_seqs):
        j = j + 1 if seq is prev else 0
        prev = seq
        mask = seq.allowed_token_bitmask
        if mask is not None:
            width = len(mask) // (1 + len(seq.draft_token_ids))
            out.append((r, mask[j * width:(j + 1) * width]))
    return out


def _tree_positions(seqs: list[ScheduledSeq], qsl: list[int], start: np.ndarray,
                    positions: np.ndarray) -> list[tuple[int, Sequence[int]]] | None:
    """The sequences drafting a token tree, with their nodes' parents; each node's position
    (in place, in `positions`) becomes its depth's, while its slot stays that of its place
    in the chunk. None without trees."""
    trees = []
    for i, seq in enumerate(seqs):
        parents = seq.draft_parents
        if seq.draft_token_ids and not is_chain(parents):
            positions[qsl[i]:qsl[i + 1]] = start[i] + np.array(depths(tuple(parents)))
            trees.append((i, parents))
    return trees or None


def _split_drafted(seqs: list[ScheduledSeq], rows: np.ndarray, start: np.ndarray,
                   qsl: list[int]) -> tuple[np.ndarray, list[int], np.ndarray,
                                            list[ScheduledSeq], np.ndarray | None]:
    """The step's attention sequences when some scheduled sequences carry drafts: each of
    those becomes one single-query sequence per token (its newest, then each draft), query j
    attending to the context up to and including itself, as a decode does (a token tree's
    node j: to the context before its chunk and, of the chunk up to itself, to its
    ancestors). A step of decodes with drafts is then a decode step (batched decode
    attention, a CUDA graph that fits), whose keys and values are all in the cache before
    any layer's attention reads them. Returns their block-table rows, query start offsets,
    context lengths, the scheduled sequence of each, and with trees each one's
    (tree_lo, tree_bits) [2, n] (see AttentionMetadata.decode_tree_lo), else None."""
    att_rows: list[int] = []
    att_qsl = [0]
    att_lens: list[int] = []
    owners: list[ScheduledSeq] = []
    lo: list[int] = []
    bits: list[int] = []
    for i, seq in enumerate(seqs):
        if seq.draft_token_ids:
            n = qsl[i + 1] - qsl[i]
            att_rows += [rows[i]] * n
            att_qsl += range(qsl[i] + 1, qsl[i + 1] + 1)
            att_lens += range(start[i] + 1, start[i] + n + 1)
            owners += [seq] * n
            if is_chain(seq.draft_parents):
                bits += [0] * n
                lo += range(start[i] + 1, start[i] + n + 1)
            else:
                bits += tree_bits(tuple(seq.draft_parents))
                lo += [start[i]] * n
        else:
            att_rows.append(rows[i])
            att_qsl.append(qsl[i + 1])
            att_lens.append(start[i] + qsl[i + 1] - qsl[i])
            owners.append(seq)
            lo.append(att_lens[-1])
            bits.append(0)
    trees = np.array([lo, bits], dtype=np.int64) if any(bits) else None
    return (np.array(att_rows, dtype=rows.dtype), att_qsl, np.array(att_lens, dtype=np.int64),
            owners, trees)


def _draft_histories(d: _Drafted, histories: list[list[int]]) -> None:
    """The output history of each of a drafted sequence's sampled rows (in place): the
    output so far, then the drafts from the root to the row's node."""
    out_ids = histories[d.first]
    paths: list[list[int]] = [[]]
    for i, token in enumerate(d.draft):
        parent = d.parents[i] if d.parents else i
        paths.append([*paths[parent], token])
        histories[d.first + i + 1] = [*out_ids, *paths[-1]]


class PendingStep:
    """A submitted step: its sampled tokens and logprobs are on their way to the host.

    `result()` waits for them (on CUDA, for an event recorded after their copies, not for
    the whole stream) and returns the step's RunnerOutput.
    """

    def __init__(self, ready: torch.cuda.Event | None = None) -> None:
        self._ready = ready
        self.sampled_ids: list[str] = []                      # request of each sampled row
        self.sampled: torch.Tensor | None = None              # [num_sampled] int64, host
        self.drafts: list[_Drafted] = []                      # speculative decoding
        self.logprobs: LogprobsTensors | None = None          # host
        self.logprobs_k: list[tuple[int, str, int]] = []      # (row, request, top-k asked)
        # (request, first prompt position scored, host logprobs, k)
        self.prompt_logprobs: list[tuple[str, int, LogprobsTensors, int]] = []
        # draft heads: their guesses [num_requests, k] (host) and the request of each row
        self.guess_ids: list[str] = []
        self.guesses: torch.Tensor | None = None

    def result(self) -> RunnerOutput:
        if self._ready is not None:
            self._ready.synchronize()
        out = RunnerOutput()
        if self.sampled is not None:
            tokens = self.sampled.tolist()
            out.sampled = dict(zip(self.sampled_ids, tokens))
            for d in self.drafts:   # drafts are kept while the model sampled them too
                kept = d.kept(tokens)
                out.sampled[d.req_id] = tokens[d.first + (kept[-1] + 1 if kept else 0)]
                out.num_accepted[d.req_id] = len(kept)
                if d.parents:
                    out.accepted_paths[d.req_id] = kept
        if self.logprobs is not None:
            lp = self.logprobs
            for row, rid, k in self.logprobs_k:     # a request's last row is its token's
                out.logprobs[rid] = lp.to_list(row, k)
            if self.drafts:
                self._draft_logprobs(out)
        for rid, first, lp, k in self.prompt_logprobs:
            entries: list[Logprobs] = [lp.to_list(j, k) for j in range(lp.token_ids.shape[0])]
            out.prompt_logprobs[rid] = (first, entries)
        if self.guesses is not None:
            out.draft_token_ids = dict(zip(self.guess_ids, self.guesses.tolist()))
        return out

    def _draft_logprobs(self, out: RunnerOutput) -> None:
        """The logprobs of a drafted request's tokens: its kept drafts' rows, then the row
        of the token sampled after them."""
        assert self.logprobs is not None
        asked = {rid: k for _, rid, k in self.logprobs_k}
        for d in self.drafts:
            k = asked.get(d.req_id)
            if k is not None:   # a draft's logprobs are those of the row that sampled it
                path = out.accepted_paths.get(d.req_id, range(out.num_accepted[d.req_id]))
                nodes = [0, *(i + 1 for i in path)]
                out.draft_logprobs[d.req_id] = [self.logprobs.to_list(d.first + n, k)
                                                for n in nodes[:-1]]
                out.logprobs[d.req_id] = self.logprobs.to_list(d.first + nodes[-1], k)


# A decode step whose groups would save reading at least this much KV runs eagerly with
# shared-prefix attention rather than replaying its CUDA graph (which attends every sequence
# alone): about 1 ms of an H100's or H200's memory bandwidth, against the host's time to
# launch an eager step's kernels. An estimate, to be set from device profiles.
SHARED_PREFIX_MIN_SAVED_BYTES = 4 << 30


class ModelRunner:
    """Executes scheduled steps on one device.

    With `graph_sizes` (CUDA only), decode-only steps of up to the largest size replay CUDA
    graphs captured here, once the KV cache is allocated; with `cpu_graphs` (CPU only, not
    with LoRA, a window or SnapKV), small decode-only steps replay their recorded calls.
    `max_model_len` (the longest sequence) bounds their block tables and fixes their
    decode-attention splits. With
    `window`, every query attends within its sliding window and to the attention sinks
    (the block tables then hold NULL_BLOCK where the pool took a block back). With `snapkv`,
    a step that ends a prompt the scheduler compresses writes the entries kept of its KV
    (taskloom.ops.kv_compress), and later steps attend from its kv_start. With `drafter`
    (Medusa's or Hydra's heads), a step that asks for guesses (SchedulerOutput.num_model_drafts)
    returns the heads' drafts for each sampled request's next step: a chain, or with
    `draft_tree` a guess per node of that tree. A sequence whose drafts form a tree
    (ScheduledSeq.draft_parents) attends by its tree mask (on a GPU, in a step of decodes:
    one decode a node, each seeing its ancestors by bits, in a CUDA graph), and once its
    step has sampled, the KV of the path it kept moves to the slots of the positions that
    path stands for.
    """

    def __init__(self, model: nn.Module, arch: ArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, eos_token_ids: tuple[int, ...],
                 max_model_len: int, graph_sizes: Sequence[int] = (),
                 lora: LoRAManager | None = None, shared_prefix_attention: bool = True,
                 window: AttentionWindow | None = None,
                 drafter: DraftHeads | None = None,
                 snapkv: SnapKVConfig | None = None,
                 draft_tree: TokenTree | None = None, cpu_graphs: bool = False) -> None:
        if draft_tree is not None and (window is not None or snapkv is not None
                                       or drafter is None):
            raise ValueError(
                "speculative_token_tree needs draft heads, and does not run with SnapKV or "
                "a sliding window" + ("" if window is None else f" (here {window.size} "
                                      "tokens, the model's own or the cache's)")
                + ": a tree's nodes attend by the tree mask, not by position")
        self.model = model
        self.snapkv = snapkv
        self.drafter = drafter
        self.draft_tree = draft_tree
        self.arch = arch
        self.block_size = block_size
        self.device = device
        self.eos_token_ids = eos_token_ids
        shape = (2, num_blocks, block_size, arch.num_key_value_heads, arch.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=device)
                          for _ in range(arch.num_hidden_layers)]
        self.sampler = Sampler(arch.vocab_size, device)
        self._states: dict[str, _ReqState] = {}
        self._prompt_logprob_ids: set[str] = set()    # requests that asked for them
        self.lora = lora
        self.window = window
        # a window's masks differ per query, so no prefix is attended whole by a group
        self.shared_prefix_attention = shared_prefix_attention and window is None
        self._workspace = Workspace()   # scratch the attention keeps across eager steps
        self._kv_bytes_per_token = arch.kv_bytes_per_token(dtype.itemsize)
        self._block_tables = BlockTables(-(-max_model_len // block_size))
        self.prepare_s = 0.0    # host time in `_prepare`, summed (see engine.core.StepTimes)
        self.graphs: DecodeGraphs | None = None
        # Whether a step of decodes with drafts attends as one decode per token (one graph
        # replay on a GPU); on a CPU each drafted sequence attends as one short prefill
        # chunk, which gathers its context once rather than once per token.
        self.split_drafted = bool(graph_sizes)
        # The last submitted step's sampled tokens [num_sampled] (on the device) and the row
        # of each request in it: where the next step's placeholder inputs come from.
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}
        if graph_sizes:
            if device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
            self.graphs = DecodeGraphs(model, self.kv_caches, graph_sizes, arch.hidden_size,
                                       block_size, max_model_len,
                                       None if lora is None else lora.state, window,
                                       kv_starts=snapkv is not None,
                                       tree=draft_tree is not None)
            self.graphs.capture()
        # CPU decode steps replayed from their recorded calls, with the C kernels (bf16:
        # taskloom.runtime.cpu_graphs); not with the features whose decode steps it does not
        # record
        self.cpu_graphs: CpuDecodeGraphs | None = None
        if (cpu_graphs and device.type == "cpu" and getattr(model, "ops", None) is not None
                and model.ops.name == "cpu" and lora is None and window is None
                and snapkv is None):
            self.cpu_graphs = CpuDecodeGraphs(model, self.kv_caches, block_size, max_model_len)

    @property
    def num_requests(self) -> int:
        """Requests the runner keeps state for (sampling state, a block-table row): every
        one it has seen that the scheduler has not yet reported finished, which it does
        with the next step."""
        assert self._block_tables.num_requests <= len(self._states)
        return len(self._states)

    @torch.inference_mode()
    def submit(self, sched: SchedulerOutput,
               before_sampling: Callable[[], None] | None = None) -> PendingStep:
        """Queue the step's forward and sampling; the results come with `result()`.
        `before_sampling` runs once the forward is queued, before anything reads what it
        fills: the step's structured-output masks (Scheduler.fill_bitmasks), computed on the
        host while a GPU runs the forward."""
        self._update_states(sched)
        if sched.is_empty:
            return PendingStep()
        t0 = time.perf_counter()
        batch = self._prepare(sched.seqs)
        batch.has_bitmasks = sched.has_bitmasks
        self.prepare_s += time.perf_counter() - t0
        hidden = self._forward(batch)                            # [num_tokens, hidden]
        if before_sampling is not None:
            before_sampling()
        cuda = self.device.type == "cuda"
        pending = PendingStep(torch.cuda.Event() if cuda else None)
        rows = self._sample(hidden, batch, pending)
        has_trees = any(d.parents for d in batch.drafts)
        kept = (self._kept_nodes(batch) if batch.drafts and (has_trees or
                                                             sched.num_model_drafts) else None)
        if has_trees:
            assert kept is not None
            self._compact_trees(batch, kept)
        if sched.num_model_drafts and rows is not None:
            self._guess_drafts(hidden, rows, batch, pending, sched.num_model_drafts,
                               None if kept is None else kept.ends)
        self._prompt_logprobs(hidden, batch, sched.seqs, pending)
        if pending._ready is not None:
            pending._ready.record()
        return pending

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
            self._prompt_logprob_ids.discard(rid)
            self._block_tables.remove(rid)
            self.sampler.remove_request(rid)
        for new in sched.new_requests:
            p = new.params
            self._states[new.req_id] = _ReqState(new.prompt_token_ids, p.logprobs,
                                                 p.prompt_logprobs, new.lora, p.reads_output)
            if p.prompt_logprobs is not None:
                self._prompt_logprob_ids.add(new.req_id)
            stop_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else self.eos_token_ids)
            self.sampler.add_request(new.req_id, p, new.prompt_token_ids, stop_ids)

    def _prepare(self, seqs: list[ScheduledSeq]) -> _Batch:
        """Flatten the scheduled sequences into one unpadded batch (host arrays): one pass
        over the sequences for what only they know, then numpy for positions and slots."""
        bs = self.block_size
        rows, width = self._block_tables.sync(seqs)
        input_ids: list[int] = []
        starts: list[int] = []
        qsl = [0]
        sampled: list[int] = []
        num_sampled = 0
        placeholders: list[tuple[int, int]] = []
        for i, seq in enumerate(seqs):
            ids = seq.token_ids
            input_ids += ids
            starts.append(seq.num_computed_tokens)
            qsl.append(len(input_ids))
            if ids[-1] == PLACEHOLDER_TOKEN_ID:
                placeholders.append((len(input_ids) - 1, self._last_rows[seq.req_id]))
            if seq.sample:
                sampled.append(i)
                num_sampled += 1 + len(seq.draft_token_ids)
        n, num_tokens = len(seqs), len(input_ids)
        start = np.array(starts, dtype=np.int64)                    # [num_seqs]
        if num_tokens == n:     # decodes only: most steps
            positions, token_rows, seq_lens, max_query_len = start, rows, start + 1, 1
        else:
            q_lens = np.diff(np.array(qsl, dtype=np.int64))         # [num_seqs]
            token_rows = np.repeat(rows, q_lens)                    # [num_tokens]
            positions = np.arange(num_tokens) + np.repeat(start - qsl[:-1], q_lens)
            seq_lens, max_query_len = start + q_lens, int(q_lens.max())
        table = self._block_tables.table
        slots = table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        compressions = (self._snapkv_plans(seqs, rows, qsl) if self.snapkv is not None
                        else None)
        owners: Sequence[ScheduledSeq] = seqs
        drafts: list[_Drafted] = []
        trees, tree_rows = None, None
        if num_sampled == len(sampled):     # no drafts: the last token of each
            sample_rows = [qsl[i + 1] - 1 for i in sampled]
            sample_seqs = [seqs[i] for i in sampled]
            # the output token number each samples: the one after the step's last token
            sample_index = [s.num_computed_tokens + len(s.token_ids) - s.num_prompt_tokens
                            for s in sample_seqs]
        else:
            sample_rows, sample_seqs, sample_index, drafts = _draft_rows(seqs, sampled, qsl)
            trees = _tree_positions(seqs, qsl, start, positions)
            if self.split_drafted and num_sampled == num_tokens and all(   # decodes only
                    len(p) < MAX_DECODE_TREE_NODES for _, p in trees or ()):
                rows, qsl, seq_lens, owners, tree_rows = _split_drafted(seqs, rows, start, qsl)
                max_query_len, trees = 1, None
        return _Batch(
            input_ids=np.array(input_ids, dtype=np.int64), positions=positions, slots=slots,
            query_start_loc=qsl, seq_lens=seq_lens,
            block_tables=self._block_tables.tables(rows, width),
            sample_rows=np.array(sample_rows, dtype=np.int64), sample_seqs=sample_seqs,
            sample_index=sample_index, drafts=drafts,
            seq_loras=None if self.lora is None else [self._states[s.req_id].lora
                                                      for s in owners],
            placeholders=placeholders, max_query_len=max_query_len,
            kv_starts=(None if self.snapkv is None or not any(s.kv_start for s in owners)
                       else np.array([s.kv_start for s in owners], dtype=np.int64)),
            compressions=compressions, trees=trees, tree_rows=tree_rows)

    def _snapkv_plans(self, seqs: list[ScheduledSeq], rows: np.ndarray, qsl: list[int]
                      ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None:
        """Host arrays of the step's compressions (sequences whose `compress` is set, whose
        chunk ends their prompt): the rows of the window's queries, the cache slots of the
        prompt's positions (from its table this step), and those of the kept entries."""
        snapkv = self.snapkv
        assert snapkv is not None
        out = []
        bs, table = self.block_size, self._block_tables.table
        w = snapkv.window_size
        for i, seq in enumerate(seqs):
            c = seq.compress
            if c is None:
                continue
            n = c.num_prompt_tokens
            if seq.num_computed_tokens + len(seq.token_ids) != n or len(seq.token_ids) < w:
                raise RuntimeError(f"{seq.req_id}: a compressing chunk must end its prompt "
                                   f"and hold its window of {w} tokens")
            pos = np.arange(n)
            src = table[rows[i], pos // bs].astype(np.int64) * bs + pos % bs
            kept = pos[c.first_position:]
            dest = np.array(c.block_ids, dtype=np.int64)[kept // bs - c.first_position // bs]
            out.append((np.arange(qsl[i + 1] - w, qsl[i + 1]), src, dest * bs + kept % bs))
        return out or None

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of the batch: a CUDA graph replay for a decode
        step that one fits, else an eager forward over the unpadded batch."""
        lora_slots = None if self.lora is None else self.lora.assign_slots(batch.seq_loras)
        graphs = self.graphs
        groups = self._shared_prefix_groups(batch)
        if (graphs is not None and batch.max_query_len == 1 and graphs.fits(len(batch.seq_lens))
                and (batch.kv_starts is None or graphs.kv_starts)
                and (batch.tree_rows is None or graphs.tree)
                and saved_token_reads(groups, self.block_size) * self._kv_bytes_per_token
                < SHARED_PREFIX_MIN_SAVED_BYTES):
            return graphs.run(batch.input_ids, batch.positions, batch.slots, batch.seq_lens,
                              batch.block_tables, lora_slots, self._fill_placeholders(batch),
                              batch.kv_starts, batch.tree_rows)
        cpu_graphs = self.cpu_graphs
        if (cpu_graphs is not None and batch.max_query_len == 1 and not groups
                and batch.kv_starts is None and batch.tree_rows is None
                and cpu_graphs.fits(len(batch.seq_lens))):
            input_ids = to_device(batch.input_ids, torch.int64, self.device)
            fill = self._fill_placeholders(batch)
            if fill is not None:
                fill(input_ids)
            hidden = cpu_graphs.run(input_ids, batch.positions, batch.slots, batch.seq_lens,
                                    batch.block_tables)
            if hidden is not None:
                return hidden
        if self.lora is not None and lora_slots is not None:
            self.lora.set_step(lora_slots, batch.query_lens)
        dev = self.device
        seq_lens = batch.seq_lens.tolist()
        meta = AttentionMetadata(
            slot_mapping=to_device(batch.slots, torch.int64, dev),
            query_start_loc=to_device(batch.query_start_loc, torch.int32, dev),
            seq_lens=to_device(batch.seq_lens, torch.int32, dev),
            block_tables=to_device(batch.block_tables, torch.int32, dev),
            query_start_loc_cpu=batch.query_start_loc, seq_lens_cpu=seq_lens,
            max_query_len=batch.max_query_len, max_seq_len=max(seq_lens),
            block_size=self.block_size, window=self.window, shared_prefix_groups=groups,
            workspace=self._workspace)
        if batch.kv_starts is not None:
            meta.kv_starts = to_device(batch.kv_starts, torch.int32, dev)
            meta.kv_starts_cpu = batch.kv_starts.tolist()
        if batch.trees:
            set_tree_masks(meta, batch.trees)
        if batch.tree_rows is not None:
            lo, bits = batch.tree_rows
            meta.decode_tree_lo = to_device(lo, torch.int32, dev)
            meta.decode_tree_bits = to_device(bits, torch.int64, dev)
            meta.decode_tree_lo_cpu, meta.decode_tree_bits_cpu = lo.tolist(), bits.tolist()
        if batch.compressions:
            snapkv = self.snapkv
            assert snapkv is not None
            meta.kv_compressions = [
                SnapKVPlan(to_device(q, torch.int64, dev), to_device(src, torch.int64, dev),
                           to_device(dest, torch.int64, dev), snapkv.kernel_size,
                           snapkv.pooling) for q, src, dest in batch.compressions]
        input_ids = to_device(batch.input_ids, torch.int64, dev)
        fill = self._fill_placeholders(batch)
        if fill is not None:
            fill(input_ids)
        positions = to_device(batch.positions, torch.int64, dev)
        return self.model(input_ids, positions, self.kv_caches, meta)

    def _shared_prefix_groups(self, batch: _Batch) -> list[PrefixGroup]:
        """The step's decodes that share cached prefix blocks (none with shared-prefix
        attention off, or where token-tree nodes see only part of their chunk)."""
        if not self.shared_prefix_attention or batch.tree_rows is not None:
            return []
        qsl, tables = batch.query_start_loc, batch.block_tables
        if batch.max_query_len == 1:    # decodes only: every row
            decodes: Sequence[int] = range(len(qsl) - 1)
        else:
            decodes = [i for i in range(len(qsl) - 1) if qsl[i + 1] - qsl[i] == 1]
        if batch.kv_starts is not None:     # a compressed prompt's KV is its own
            decodes = [i for i in decodes if not batch.kv_starts[i]]
        if len(decodes) < 2 or not may_share(tables[decodes, 0].tolist()):
            return []
        return shared_prefix_groups(tables, batch.seq_lens.tolist(), decodes, self.block_size)

    def _fill_placeholders(self, batch: _Batch) -> Callable[[torch.Tensor], None] | None:
        """What writes the previous step's sampled tokens (still on the device) over the
        batch's placeholder inputs, given the input-id tensor; None without placeholders."""
        if not batch.placeholders:
            return None
        assert self._last_sampled is not None, "placeholder inputs without a step before"
        dst, src = zip(*batch.placeholders)
        dst_t = to_device(dst, torch.int64, self.device)
        values = self._last_sampled.index_select(0, to_device(src, torch.int64, self.device))
        return lambda input_ids: input_ids.index_copy_(0, dst_t, values)

    def _sample(self, hidden: torch.Tensor, batch: _Batch, pending: PendingStep
                ) -> torch.Tensor | None:
        """Sample the batch's sampling rows; start copying the tokens (and logprobs) to the
        host, and keep the device tokens for the next step's placeholders. Returns the rows
        sampled (flat token indexes on the device), None if none."""
        if not len(batch.sample_rows):
            self._last_sampled, self._last_rows = None, {}
            return None
        rows = to_device(batch.sample_rows, torch.int64, self.device)
        logits = self.model.compute_logits(hidden[rows])          # [num_sampled, vocab]
        seqs = batch.sample_seqs
        masked = _row_bitmasks(seqs) if batch.has_bitmasks else None
        if masked:      # structured outputs: only the tokens their grammars allow
            apply_token_bitmask(logits, *zip(*masked))
        req_ids = [s.req_id for s in seqs]
        histories = [s.output_token_ids for s in seqs]
        for d in batch.drafts:
            if self._states[d.req_id].needs_history:    # each row sees the drafts before it
                _draft_histories(d, histories)
        pending.drafts = batch.drafts
        result = self.sampler(logits, req_ids, histories, batch.sample_index)
        self._last_sampled = result.sampled
        self._last_rows = {rid: i for i, rid in enumerate(req_ids)}
        pending.sampled_ids = req_ids
        pending.sampled = to_host(result.sampled)
        if result.logprobs is not None:
            pending.logprobs = result.logprobs.to_host()
            states = self._states
            pending.logprobs_k = [(i, rid, k) for i, rid in enumerate(req_ids)
                                  if (k := states[rid].logprobs) is not None]
        return rows

    def _kept_nodes(self, batch: _Batch) -> _Kept:
        """Which nodes of each drafted sequence's drafts (batch.drafts order; the root, then
        each draft) the model kept, found on the device from the sampled tokens, so nothing
        waits for them: a draft is kept where it equals the token sampled at its parent and
        its parent is kept."""
        drafts, dev = batch.drafts, self.device
        sampled = self._last_sampled                                     # [num_sampled]
        assert sampled is not None
        width = max(len(d.draft) for d in drafts)
        tokens = np.full((len(drafts), width), -1, dtype=np.int64)      # -1 matches nothing
        parents = np.zeros((len(drafts), width), dtype=np.int64)
        depth = np.zeros((len(drafts), width + 1), dtype=np.int64)
        for r, d in enumerate(drafts):
            k = len(d.draft)
            tokens[r, :k] = d.draft
            parents[r, :k] = d.tree
            depth[r, :k + 1] = depths(tuple(d.tree))
        firsts = np.array([d.first for d in drafts], dtype=np.int64)[:, None]
        parents_t = to_device(parents, torch.int64, dev)                 # [R, W]
        ok = sampled[to_device(firsts + parents, torch.int64, dev)] == to_device(
            tokens, torch.int64, dev)                                    # [R, W]
        root = torch.ones((len(drafts), 1), dtype=torch.bool, device=dev)
        kept = torch.cat([root, ok], dim=1)                              # [R, 1 + W]
        for _ in range(int(depth.max()) - 1):   # a level further down each time
            kept = torch.cat([root, ok & kept.gather(1, parents_t)], dim=1)
        depth_t = to_device(depth, torch.int64, dev)
        return _Kept(kept, depth, depth_t, (kept * (depth_t + 1)).argmax(dim=1))

    def _compact_trees(self, batch: _Batch, kept: _Kept) -> None:
        """Move the KV of each token tree's kept path to the cache slots of the positions
        its nodes stand for: the node at depth e, computed at chunk slot e' >= e, goes to
        slot e. A depth off the path copies its slot onto itself, so every slot is written
        once; all reads come before the writes."""
        slots, depth = batch.slots, kept.depth
        ent_r, ent_e, dst = [], [], []
        chunk = np.zeros(depth.shape, dtype=np.int64)   # [R, 1 + W] each node's slot
        for r, d in enumerate(batch.drafts):
            if not d.parents:
                continue
            root = int(batch.sample_rows[d.first])      # the chunk's first token
            chunk[r, :len(d.draft) + 1] = slots[root:root + len(d.draft) + 1]
            for e in range(1, int(depth[r].max()) + 1):
                ent_r.append(r)
                ent_e.append(e)
                dst.append(slots[root + e])
        dev = self.device
        r_t, e_t = to_device(ent_r, torch.int64, dev), to_device(ent_e, torch.int64, dev)
        on_path = kept.nodes[r_t] & (kept.depth_t[r_t] == e_t[:, None])
        node = torch.where(on_path.any(dim=1), on_path.int().argmax(dim=1), e_t)    # [E]
        src = to_device(chunk, torch.int64, dev)[r_t, node]                         # [E]
        dst_t = to_device(dst, torch.int64, dev)
        for cache in self.kv_caches:
            flat = cache.view(2, -1, *cache.shape[3:])  # [2, num_slots, kv_heads, head_dim]
            flat.index_copy_(1, dst_t, flat.index_select(1, src))

    def _guess_drafts(self, hidden: torch.Tensor, rows: torch.Tensor, batch: _Batch,
                      pending: PendingStep, k: int, ends: torch.Tensor | None) -> None:
        """Draft heads: each sampled request's drafts for its next step (a chain of k, or
        with a token tree, a guess per node), the heads read at its last accepted position
        (its newest token's, or its last kept draft's: `ends`, found by `_kept_nodes`) and
        the token sampled there, which the sampled tokens decide: found on the device, so
        nothing waits for them here."""
        assert self.drafter is not None, "the scheduler asked for guesses without heads"
        seqs, dev = batch.sample_seqs, self.device
        sampled = self._last_sampled                                     # [num_sampled]
        assert sampled is not None
        firsts = [r for r, seq in enumerate(seqs) if r == 0 or seq is not seqs[r - 1]]
        at = to_device(firsts, torch.int64, dev)                        # [num_requests]
        if ends is not None:
            index = {first: i for i, first in enumerate(firsts)}
            drafted = to_device([index[d.first] for d in batch.drafts], torch.int64, dev)
            at = at.index_add(0, drafted, ends)                          # + drafts kept
        if self.draft_tree is not None:
            guesses = self.drafter.propose_tree(hidden[rows[at]], sampled[at],
                                                self.draft_tree)       # [num_requests, nodes]
        else:
            guesses = self.drafter.propose(hidden[rows[at]], sampled[at], k)  # [requests, k]
        pending.guess_ids = [seqs[r].req_id for r in firsts]
        pending.guesses = to_host(guesses)

    def _prompt_logprobs(self, hidden: torch.Tensor, batch: _Batch, seqs: list[ScheduledSeq],
                         pending: PendingStep) -> None:
        """Score prompt tokens 1..P-1 from the hidden states of positions 0..P-2 in this chunk."""
        if not self._prompt_logprob_ids:
            return
        offset = 0      # where the next sequence's tokens start in the flat batch
        for seq in seqs:
            row0, offset = offset, offset + len(seq.token_ids)
            state = self._states[seq.req_id]
            k = state.prompt_logprobs
            start = seq.num_computed_tokens
            end = min(start + len(seq.token_ids), seq.num_prompt_tokens - 1)
            if k is None or end <= start:
                continue
            rows = torch.arange(row0, row0 + end - start, device=self.device)
            logits = self.model.compute_logits(hidden[rows])      # [end - start, vocab]
            targets = to_device(state.prompt_token_ids[start + 1:end + 1], torch.int64,
                                self.device)
            lp = compute_prompt_logprobs(logits, targets, k)
            pending.prompt_logprobs.append((seq.req_id, start + 1, lp.to_host(), k))
