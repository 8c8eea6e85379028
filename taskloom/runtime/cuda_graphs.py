"""CUDA graphs for decode-only steps: the model's forward captured once per bucket batch size.

A decode step (every scheduled sequence brings exactly one new token) launches a few kernels
per layer on tiny tensors, so on a GPU its time goes to launching them; replaying a captured
graph launches them all at once. At startup, once the KV cache exists, the forward is captured
for each bucket size, largest first, all graphs sharing one memory pool. The graphs read static
buffers (`DecodeInputs`): before a replay the step's real values are copied into them (one
host-to-device copy per buffer, from pinned memory) and the rows up to the bucket size are
padding, which attends one token of block 0 and writes nothing into the cache. The hidden
states of the real rows are then read from the static output buffer; logits and sampling run
eagerly after the replay.

With LoRA adapters, each row's adapter slot is one more static buffer (-1: none), and the
graphs are captured with every row treated as a one-token LoRA segment, so a replay serves
any mix of adapters already in their slots. With SnapKV (`kv_starts`), where each row's KV
starts is one more (0: the whole context). With token trees (`tree`), each row's view of its
tree's chunk is two more (a node's tree_lo and ancestor bits; other rows see all).

Steps with a prefill chunk, or more sequences than the largest bucket, run eagerly. Capture
needs kernels that never read the step from the host: the Triton ops (the torch reference
attention plans on host copies of the metadata), with a fixed number of decode splits per
graph (`AttentionMetadata.decode_num_splits`).
"""
from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from taskloom.config import AttentionWindow
from taskloom.lora.layers import LoRAState
from taskloom.lora.metadata import LoRAMetadata
from taskloom.runtime.attention import AttentionMetadata

logger = logging.getLogger(__name__)

MAX_DEFAULT_SIZE = 256

IntArray = Sequence[int] | np.ndarray   # one int per sequence of the step


def default_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then multiples of 8, up to the first that holds `min(max_num_seqs, 256)`."""
    cap = min(max_num_seqs, MAX_DEFAULT_SIZE)
    sizes = [1, 2, 4] + list(range(8, MAX_DEFAULT_SIZE + 1, 8))
    return tuple(sizes[:bisect.bisect_left(sizes, cap) + 1])


def bucket_size(sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest of the ascending `sizes` that holds `num_seqs`; None if none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


class DecodeInputs:
    """The static input buffers of captured decode steps, and their host staging.

    Device buffers hold `max_size` rows; the graph of a bucket reads the first `size`. Rows past
    the step's sequences are padding: token 0 at position 0, slot -1 (the KV write skips it),
    seq_len 1 and block 0. `query_start_loc` is constant (one token per sequence).
    """

    def __init__(self, max_size: int, max_blocks_per_seq: int,
                 device: torch.device) -> None:
        pinned = device.type == "cuda"
        self.non_blocking = pinned
        # [3, max_size]: rows input_ids, positions, slot_mapping
        self.tokens = torch.zeros(3, max_size, dtype=torch.int64, device=device)
        self.tokens[2].fill_(-1)
        self.seq_lens = torch.ones(max_size, dtype=torch.int32, device=device)    # [max_size]
        self.block_tables = torch.zeros(max_size, max_blocks_per_seq, dtype=torch.int32,
                                        device=device)       # [max_size, max_blocks_per_seq]
        self.query_start_loc = torch.arange(max_size + 1, dtype=torch.int32,
                                            device=device)   # [max_size + 1]
        self.lora_slots = torch.full((max_size,), -1, dtype=torch.int32,
                                     device=device)          # [max_size]
        self._host_lora_slots = torch.full((max_size,), -1, dtype=torch.int32,
                                           pin_memory=pinned)
        self._host_tokens = torch.zeros(3, max_size, dtype=torch.int64, pin_memory=pinned)
        self._host_seq_lens = torch.ones(max_size, dtype=torch.int32, pin_memory=pinned)
        self.kv_starts = torch.zeros(max_size, dtype=torch.int32, device=device)  # [max_size]
        self._host_kv_starts = torch.zeros(max_size, dtype=torch.int32, pin_memory=pinned)
        # token trees: [2, max_size] rows tree_lo, tree_bits (AttentionMetadata.decode_tree_lo)
        self.tree = torch.ones(2, max_size, dtype=torch.int64, device=device)
        self.tree[1].zero_()
        self.tree_lo = torch.ones(max_size, dtype=torch.int32, device=device)  # [max_size]
        self._host_tree = torch.zeros(2, max_size, dtype=torch.int64, pin_memory=pinned)
        # Flat: a step's [size, width] tables are staged contiguously.
        self._host_tables = torch.zeros(max_size * max_blocks_per_seq, dtype=torch.int32,
                                        pin_memory=pinned)

    def metadata(self, size: int, block_size: int, max_model_len: int, num_splits: int,
                 window: AttentionWindow | None = None, kv_starts: bool = False,
                 tree: bool = False) -> AttentionMetadata:
        """The metadata a graph of `size` rows is captured with: views of the static buffers,
        and host fields that hold for every decode step (one query token, at most
        `max_model_len` tokens of context; with `kv_starts`, the rows' kv_starts read from
        their buffer; with `tree`, the rows' token-tree bits, read from theirs)."""
        meta = AttentionMetadata(
            slot_mapping=self.tokens[2, :size], query_start_loc=self.query_start_loc[:size + 1],
            seq_lens=self.seq_lens[:size], block_tables=self.block_tables[:size],
            query_start_loc_cpu=list(range(size + 1)), seq_lens_cpu=[max_model_len] * size,
            max_query_len=1, max_seq_len=max_model_len, block_size=block_size,
            window=window, decode_num_splits=num_splits)
        if kv_starts:
            meta.kv_starts, meta.kv_starts_cpu = self.kv_starts[:size], [0] * size
        if tree:
            meta.decode_tree_lo, meta.decode_tree_bits = self.tree_lo[:size], self.tree[1, :size]
        return meta

    def load_tree(self, tree_rows: np.ndarray | None, seq_lens: IntArray) -> None:
        """Stage one decode step's token-tree rows ((tree_lo, tree_bits) [2, n]; None: no
        row sees part of a chunk; padding rows: their seq_len 1 and no bits)."""
        n = len(seq_lens)
        host = self._host_tree.numpy()                       # [2, max_size]
        if tree_rows is None:
            host[0, :n], host[1, :n] = seq_lens, 0
        else:
            host[:, :n] = tree_rows
        host[0, n:], host[1, n:] = 1, 0
        self.tree.copy_(self._host_tree, non_blocking=self.non_blocking)
        self.tree_lo.copy_(self.tree[0])                     # int32, on the device
    def load_kv_starts(self, kv_starts: IntArray | None, n: int) -> None:
        """Stage one decode step's kv_starts (None: all 0; padding rows: 0)."""
        host = self._host_kv_starts.numpy()                  # [max_size]
        host[:n] = 0 if kv_starts is None else kv_starts
        host[n:] = 0
        self.kv_starts.copy_(self._host_kv_starts, non_blocking=self.non_blocking)

    def lora_metadata(self, size: int) -> LoRAMetadata:
        """LoRA metadata a graph of `size` rows is captured with: one segment per row, each
        reading its slot from the static buffer at replay."""
        return LoRAMetadata(
            token_slots=self.lora_slots[:size], seg_starts=self.query_start_loc[:size + 1],
            seg_slots=self.lora_slots[:size], seg_starts_cpu=list(range(size + 1)),
            seg_slots_cpu=[0] * size, max_seg_len=1)

    def load_lora_slots(self, lora_slots: list[int]) -> None:
        """Stage one decode step's per-row adapter slots (padding rows: -1)."""
        host = self._host_lora_slots.numpy()                 # [max_size]
        host[:len(lora_slots)], host[len(lora_slots):] = lora_slots, -1
        self.lora_slots.copy_(self._host_lora_slots, non_blocking=self.non_blocking)

    def load(self, input_ids: IntArray, positions: IntArray, slots: IntArray,
             seq_lens: IntArray, block_tables: np.ndarray | list[list[int]], size: int) -> None:
        """Write one decode step (n <= size sequences; `block_tables` [n, width], padded) into
        the host staging, pad rows n..size, and copy each buffer to the device once (of the
        block tables only the step's width: columns past it are never read).

        The caller must make sure the previous load's copies are done before calling again.
        """
        n = len(seq_lens)
        tokens = self._host_tokens.numpy()                   # [3, max_size]
        tokens[0, :n], tokens[1, :n], tokens[2, :n] = input_ids, positions, slots
        tokens[:2, n:], tokens[2, n:] = 0, -1
        lens = self._host_seq_lens.numpy()                   # [max_size]
        lens[:n], lens[n:] = seq_lens, 1
        width = len(block_tables[0])       # [n, width]
        host_tables = self._host_tables[:size * width].view(size, width)  # [size, width]
        tables = host_tables.numpy()
        tables[:n], tables[n:] = block_tables, 0
        self.tokens.copy_(self._host_tokens, non_blocking=self.non_blocking)
        self.seq_lens.copy_(self._host_seq_lens, non_blocking=self.non_blocking)
        self.block_tables[:size, :width].copy_(host_tables, non_blocking=self.non_blocking)


class DecodeGraphs:
    """The model's forward over `DecodeInputs`, captured as one CUDA graph per bucket size."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], sizes: Sequence[int],
                 hidden_size: int, block_size: int, max_model_len: int,
                 lora_state: LoRAState | None = None,
                 window: AttentionWindow | None = None, kv_starts: bool = False,
                 tree: bool = False) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"CUDA graph sizes must be batch sizes >= 1, got {list(sizes)}")
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = tuple(sorted(set(sizes)))
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.window = window
        self.kv_starts = kv_starts      # rows may start their KV past 0 (SnapKV)
        self.tree = tree                # rows may be token-tree nodes (decode_tree_lo / _bits)
        self.device = kv_caches[0].device
        self.inputs = DecodeInputs(self.sizes[-1], -(-max_model_len // block_size), self.device)
        self.hidden = torch.empty(self.sizes[-1], hidden_size, dtype=kv_caches[0].dtype,
                                  device=self.device)        # [max_size, hidden]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._loaded = torch.cuda.Event()
        self.lora_state = lora_state

    @property
    def max_size(self) -> int:
        return self.sizes[-1]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, into one shared memory pool. Each size runs
        once eagerly first, so Triton compiles and cuBLAS initialises outside the capture."""
        with torch.cuda.device(self.device):
            self._capture_all()

    def _capture_all(self) -> None:
        """`capture` on the current device; logs the time taken and the memory used."""
        from taskloom.ops.triton.decode_attention import decode_num_splits
        torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        num_kv_heads = self.kv_caches[0].shape[3]
        for size in reversed(self.sizes):
            attended = self.max_model_len if self.window is None else min(
                self.max_model_len, self.window.size + self.window.num_sink_tokens)
            splits = decode_num_splits(size, num_kv_heads, attended)
            meta = self.inputs.metadata(size, self.block_size, self.max_model_len, splits,
                                        self.window, self.kv_starts, self.tree)
            if self.lora_state is not None:
                self.lora_state.meta = self.inputs.lora_metadata(size)
            self._forward(size, meta)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size, meta)
            self.graphs[size] = graph
        if self.lora_state is not None:
            self.lora_state.meta = None
        torch.cuda.synchronize()
        used = free_before - torch.cuda.mem_get_info()[0]
        logger.info("captured %d CUDA graphs for decode steps (batch sizes %s) in %.1f s, "
                    "using %.1f MiB of GPU memory", len(self.sizes),
                    ", ".join(map(str, self.sizes)), time.perf_counter() - start, used / 2**20)

    def _forward(self, size: int, meta: AttentionMetadata) -> None:
        hidden = self.model(self.inputs.tokens[0, :size], self.inputs.tokens[1, :size],
                            self.kv_caches, meta)            # [size, hidden]
        self.hidden[:size].copy_(hidden)

    def fits(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` sequences has a graph."""
        return num_seqs <= self.max_size

    def run(self, input_ids: IntArray, positions: IntArray, slots: IntArray,
            seq_lens: IntArray, block_tables: np.ndarray | list[list[int]],
            lora_slots: list[int] | None = None,
            fill_input_ids: Callable[[torch.Tensor], None] | None = None,
            kv_starts: IntArray | None = None,
            tree_rows: np.ndarray | None = None) -> torch.Tensor:
        """Replay the graph of the smallest bucket that holds this decode step (one token per
        sequence; arrays as for the eager batch; `lora_slots`: each sequence's adapter slot,
        when captured with LoRA; `fill_input_ids` writes tokens still on the device into the
        static input ids, after the step's are loaded; `kv_starts`, when captured with them;
        `tree_rows`, token-tree nodes' (tree_lo, tree_bits) [2, n], when captured with trees).
        Returns the hidden states
        [num_seqs, hidden], a view of the static output valid until the next replay."""
        n = len(seq_lens)
        size = bucket_size(self.sizes, n)
        if size is None:
            raise ValueError(f"a decode step of {n} sequences exceeds the largest CUDA graph "
                             f"({self.max_size})")
        self._loaded.synchronize()      # the pinned staging is free once its last copy is done
        self.inputs.load(input_ids, positions, slots, seq_lens, block_tables, size)
        if self.lora_state is not None:
            self.inputs.load_lora_slots(lora_slots if lora_slots is not None else [-1] * n)
        if self.kv_starts:
            self.inputs.load_kv_starts(kv_starts, n)
        elif kv_starts is not None:
            raise ValueError("these CUDA graphs were captured without kv_starts")
        if self.tree:
            self.inputs.load_tree(tree_rows, seq_lens)
        elif tree_rows is not None:
            raise ValueError("these CUDA graphs were captured without token trees")
        self._loaded.record(torch.cuda.current_stream(self.device))
        if fill_input_ids is not None:
            fill_input_ids(self.inputs.tokens[0])
        self.graphs[size].replay()
        return self.hidden[:n]
