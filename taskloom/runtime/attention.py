"""Attention metadata: how a flat batch of tokens maps onto sequences and the paged KV cache.

The model runner builds one `AttentionMetadata` per step and passes it explicitly to the
model's forward; attention layers use it to write the new keys/values into the cache and to
read each sequence's whole context back through its block table.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from taskloom.config import AttentionWindow
from taskloom.runtime.shared_prefix import PrefixGroup
from taskloom.runtime.transfer import to_device


class Workspace:
    """Scratch buffers an attention implementation keeps from step to step, by name, grown
    as needed; the runner owns one and hands it to every eager step's metadata.

    On a CPU a fresh tensor of tens of MB is mapped from the OS and page-faulted on first
    write: gathering a decode batch's keys into a new tensor ran at a quarter of the speed of
    gathering them into one already written (17 ms against 4 ms for 50 MB on 2 cores)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
        """A tensor of `shape` viewing buffer `name` (contents undefined), valid until the
        next `get` of that name."""
        numel = 1
        for n in shape:
            numel *= n
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
            size = max(numel, 0 if buf is None else 2 * buf.numel())
            buf = self._buffers[name] = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel].view(shape)


@dataclass
class AttentionMetadata:
    """Per-step description of a flat, unpadded batch.

    Sequence i owns query tokens `query_start_loc[i]:query_start_loc[i+1]` of the flat batch;
    after this step it has `seq_lens[i]` tokens of context in the cache, so its queries sit at
    positions `seq_lens[i] - query_len_i ... seq_lens[i] - 1` and attend causally (within
    `window`, when set: a key outside every remaining query's window may sit in a block the
    pool has taken back, so no implementation reads one), from position `kv_starts[i]` on
    where set (SnapKV: the cache slots of positions kv_starts[i] .. L - 1 hold the entries
    kept of a prompt of L tokens, all of which every later query sees).

    In a captured CUDA graph the tensors are static buffers refilled before each replay, and
    the host fields describe the capture (decode-only, `max_seq_len` = the model's context
    length), not the replayed step.
    """

    slot_mapping: torch.Tensor      # [num_tokens] int64: block_id * block_size + offset
    query_start_loc: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor          # [num_seqs] int32
    block_tables: torch.Tensor      # [num_seqs, max_blocks_per_seq] int32 (padded with 0)
    query_start_loc_cpu: list[int]  # host copies, so the reference path never syncs
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Sliding window and attention sinks (KV compression; a Mistral's own window), or None.
    window: AttentionWindow | None = None
    # Splits of the Triton decode kernel. None: chosen per step from `max_seq_len`. A CUDA graph
    # fixes it at capture, since a replayed step's grid cannot follow its sequence lengths.
    decode_num_splits: int | None = None
    # Decodes attending to a shared cached prefix together (taskloom.runtime.shared_prefix):
    # the runner's groups for this step; [] for none; None lets the attention find them (the
    # torch reference does; the Triton kernels then attend every sequence alone).
    shared_prefix_groups: list[PrefixGroup] | None = None
    # Scratch buffers kept across steps (the runner's), or None: allocate per call.
    workspace: Workspace | None = None
    # SnapKV: sequence i holds KV from position kv_starts[i] on (its prompt was compressed;
    # the entries there are the kept ones) and attends to nothing before; None: all 0.
    kv_starts: torch.Tensor | None = None     # [num_seqs] int32
    kv_starts_cpu: list[int] | None = None
    # SnapKV: the prompts this step compresses once each layer has attended
    # (taskloom.ops.kv_compress.SnapKVPlan); empty for none.
    kv_compressions: list[Any] = field(default_factory=list)
    # Speculative token trees (taskloom.engine.draft_tree): sequence i with tree_starts[i]
    # >= 0 attends to its chunk by its tree mask, not causally: its query j sees the chunk's
    # key k where tree_mask[tree_starts[i] + j * q_len_i + k], and all of its context
    # before the chunk. -1 (or None for all): causal.
    tree_mask: torch.Tensor | None = None     # [sum of q_len_i ** 2 of the trees] bool
    tree_starts: torch.Tensor | None = None   # [num_seqs] int32
    tree_starts_cpu: list[int] | None = None
    # Token trees split into decodes (one single-query sequence per node, as a CUDA graph
    # replays them): sequence i sees its keys before decode_tree_lo[i] all, and the key at
    # decode_tree_lo[i] + j (a node of its tree's chunk) only where bit j of
    # decode_tree_bits[i] is set (decode_tree_lo[i] = seq_lens[i]: none masked). None: none.
    decode_tree_lo: torch.Tensor | None = None     # [num_seqs] int32
    decode_tree_bits: torch.Tensor | None = None   # [num_seqs] int64
    decode_tree_lo_cpu: list[int] | None = None
    decode_tree_bits_cpu: list[int] | None = None
    # Derived once per step by the attention implementation and shared by all layers.
    ref_plan: Any = None
    kernel_plan: Any = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


def flat_batch_metadata(block_tables: list[list[int]], num_cached: list[int],
                        query_lens: list[int], block_size: int, device: torch.device
                        ) -> tuple[AttentionMetadata, torch.Tensor]:
    """Metadata and positions [num_tokens] for sequences that have `num_cached[i]` tokens in
    the cache and `query_lens[i]` new ones, laid out one after another in the flat batch:
    what the runner would build, for a forward outside the engine (training, tests)."""
    slots, positions, starts = [], [], [0]
    for table, cached, q_len in zip(block_tables, num_cached, query_lens):
        for pos in range(cached, cached + q_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
            positions.append(pos)
        starts.append(starts[-1] + q_len)
    seq_lens = [c + q for c, q in zip(num_cached, query_lens)]
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_start_loc_cpu=starts, seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=block_size)
    return meta, torch.tensor(positions, dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def tree_mask(parents: tuple[int, ...]) -> torch.Tensor:
    """A token tree's mask [n, n] bool, n = 1 + len(parents) (node 0 the root, draft node
    i + 1 the child of node parents[i]): node j sees node k where k is j or an ancestor.
    Kept per tree (a step's trees are prefixes of one), so do not write to it."""
    n = len(parents) + 1
    mask = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i + 1] |= mask[p]
    return mask


# The most nodes (root included) a token tree may have to be attended as decodes: each
# node's view of the chunk is one int64 of bits, the sign bit unused.
MAX_DECODE_TREE_NODES = 63


@functools.lru_cache(maxsize=64)
def tree_bits(parents: tuple[int, ...]) -> tuple[int, ...]:
    """Each node's row of `tree_mask(parents)` as bits: bit k set where it sees node k."""
    n = len(parents) + 1
    if n > MAX_DECODE_TREE_NODES:
        raise ValueError(f"a tree of {n} nodes does not fit decode attention's "
                         f"{MAX_DECODE_TREE_NODES}-bit masks")
    return tuple(sum(1 << k for k in range(n) if row[k]) for row in tree_mask(parents).tolist())


def set_tree_masks(meta: AttentionMetadata, trees: Sequence[tuple[int, Sequence[int]]]
                   ) -> None:
    """Give the metadata the masks of the sequences that draft token trees: (sequence, its
    draft nodes' parents) each; the chunk of each such sequence is its tree's nodes."""
    starts = [-1] * meta.num_seqs
    masks, offset = [], 0
    for i, parents in trees:
        mask = tree_mask(tuple(parents))                                # [q_len, q_len]
        starts[i] = offset
        offset += mask.numel()
        masks.append(mask.flatten())
    device = meta.seq_lens.device
    meta.tree_mask = to_device(torch.cat(masks).numpy(), torch.bool, device)
    meta.tree_starts = to_device(starts, torch.int32, device)
    meta.tree_starts_cpu = starts
