"""Decode steps on the CPU replayed from their recorded calls: the CPU's CUDA graphs.

With the C kernels (bf16 on a CPU: `taskloom.ops.cpu_kernels`, and 4-bit projections by
`taskloom.ops.int4_vnni`), a decode step's arithmetic is a few calls a layer, and at small
batches Python is what is left: dispatching modules, checking tensors, allocating outputs and
converting ctypes arguments took ~4.5 ms of a 10 ms step of the embedded model in 4-bit at
batch 1, against ~5.3 ms in the kernels. As a CUDA graph does on a GPU, a `CpuDecodeGraphs`
runs the decoder once per batch size over static input buffers, records every call it makes
and from then on replays that list: every C kernel call with its arguments, pointers included
(`cpu_kernels.record_kernel_calls`), and every other torch operator (a bf16 model's oneDNN
GEMMs, a bias add) as an `_AtenCall` that repeats it on the tensors it was given and copies
the result into the tensors it first made, which the later calls read.

A `TorchDispatchMode` watches the recording: it keeps the tensors allocated (the pointers
point into them), passes views, records the other operators, and refuses the recording for
an operator a replay cannot repeat (one that reads a value to the host, takes one from Python,
draws random numbers or sizes its output by the data), or where the decode attention is not
the C kernel (torch's plans from metadata a recording does not hold). One refusal turns the
recording off for the model (its layers are the same at every size), and that step runs
eagerly too, again; so does any replay that fails (an operator giving another shape than it
recorded), and every step after it. A kept recording is itself the step's forward, on the
step's inputs. The static inputs are the embeddings (looked up eagerly), positions and cache
slots of the step's tokens, and the decode attention's plan (`taskloom.ops.attention.RefPlan`:
each row's cache slots, padded to `max_model_len`, and its length), written in place before
each replay. Sizes are exact (a padded row would cost a CPU its compute), up to
`CPU_GRAPH_MAX_SIZE` rows, the `MAX_GRAPHS` most recently used kept within `MAX_GRAPH_BYTES`
of intermediate tensors.

Only plain decode steps replay: every sequence one token, no sliding window, no SnapKV, no
LoRA, no token trees, no shared-prefix groups (their attention is torch's); the model runner
checks, and everything else runs eagerly as before. The recorded pointers hold because the
runner never moves the weights or the KV cache once the engine is built. The audit sees
aten operators only: a tensor made from host data without one (`torch.from_numpy`) inside
the decoder's forward would be replayed as recorded (none is; the runner builds the step's
inputs outside the forward).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from taskloom.ops.attention import RefPlan
from taskloom.ops.cpu_kernels import call_kernel, record_kernel_calls
from taskloom.runtime.attention import AttentionMetadata

logger = logging.getLogger(__name__)

# Batch sizes up to which decode steps replay (above, a step's kernels outweigh its Python).
CPU_GRAPH_MAX_SIZE = 32
MAX_GRAPHS = 8                  # recordings kept, the most recently used...
MAX_GRAPH_BYTES = 256 << 20     # ...while their tensors take at most this much (the newest
                                # always kept)
MAX_SLOTS_BYTES = 64 << 20      # the static context slots: fewer rows for very long contexts

aten = torch.ops.aten
_ALLOCATIONS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty}
_VIEWS = {aten.view, aten._unsafe_view, aten.split, aten.split_with_sizes, aten.slice,
          aten.select, aten.as_strided, aten.t, aten.transpose, aten.unsqueeze, aten.squeeze,
          aten.alias, aten.detach, aten.expand, aten.permute, aten.unbind}
# Operators a replay cannot repeat: they read values to the host, take them from Python
# (which may be the step's), draw random numbers or size their output by the data.
_UNREPEATABLE = {aten._local_scalar_dense, aten.lift_fresh, aten.lift_fresh_copy, aten.full,
                 aten.scalar_tensor, aten.nonzero, aten.masked_select, aten._unique2,
                 aten.unique_dim, aten.unique_consecutive, aten.multinomial, aten.bernoulli,
                 aten.rand, aten.randn, aten.randint, aten.normal, aten.uniform,
                 aten.exponential, aten.equal, aten.is_nonzero, aten.item, aten.allclose}


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of an operator's output (one, or a tuple or list of them)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, torch.Tensor)]
    return []


class _AtenCall:
    """A torch operator of a recording, repeated at replay into the tensors it first made
    (or, in place, on the tensors it was given): the list's later calls read those."""

    def __init__(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        self.func, self.args, self.kwargs = func, args, kwargs
        self.outs = [] if func._schema.is_mutable else _tensors(out)
        self.__name__ = str(func)

    def __call__(self) -> None:
        result = _tensors(self.func(*self.args, **self.kwargs))
        for dst, src in zip(self.outs, result):
            if dst.shape != src.shape:
                raise RuntimeError(f"{self.__name__} gave {tuple(src.shape)} where it was "
                                   f"recorded with {tuple(dst.shape)}")
            dst.copy_(src)


class _Audit(TorchDispatchMode):
    """Sees every aten operator of a recording: keeps what it allocates, passes views, adds
    every other operator to the recorded calls (`calls`, the kernel calls' list) as an
    `_AtenCall`, and names those a replay cannot repeat."""

    def __init__(self, calls: list[tuple[Any, tuple]]) -> None:
        super().__init__()
        self.calls = calls
        self.kept: list[torch.Tensor] = []
        self.foreign: list[str] = []
        self.repeated: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        op = func.overloadpacket
        if op in _ALLOCATIONS:
            self.kept.append(out)
        elif op in _UNREPEATABLE:
            self.foreign.append(str(op))
        elif op not in _VIEWS and (func._schema.is_mutable or not self._aliases(out, args)):
            call = _AtenCall(func, args, kwargs, out)
            self.kept.extend(call.outs)
            self.calls.append((call, ()))
            self.repeated.append(str(op))
        return out

    @staticmethod
    def _aliases(out: Any, args: tuple) -> bool:
        """Whether the output is a view of an input (a replay need not remake it)."""
        base = _storage(out)
        return base is not None and any(_storage(a) == base for a in args)


def _storage(t: Any) -> int | None:
    """The address of a tensor's storage; None for anything else (oneDNN's opaque packed
    weights have none)."""
    if not isinstance(t, torch.Tensor) or t.layout != torch.strided or t.is_mkldnn:
        return None
    return t.untyped_storage().data_ptr()


class _Recording:
    """One batch size's kernel calls, what they point into (the tensors allocated while
    recording, the metadata recorded with), and its output."""

    def __init__(self, calls: list[tuple[Any, tuple]], kept: list[torch.Tensor],
                 meta: AttentionMetadata, output: torch.Tensor) -> None:
        self.calls = calls
        self.kept = kept
        self.meta = meta
        self.output = output
        self.nbytes = sum(t.untyped_storage().nbytes() for t in kept)


class CpuDecodeGraphs:
    """The decoder of `model` over static inputs, recorded once per decode batch size."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], block_size: int,
                 max_model_len: int, max_size: int = CPU_GRAPH_MAX_SIZE) -> None:
        max_size = max(1, min(max_size, MAX_SLOTS_BYTES // (8 * max_model_len)))
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.max_size = max_size
        embed = model.model.embed_tokens.weight
        self.hidden = torch.empty(max_size, embed.shape[1], dtype=embed.dtype)
        self.positions = torch.zeros(max_size, dtype=torch.int64)
        self.slot_mapping = torch.zeros(max_size, dtype=torch.int64)
        self.rows = torch.arange(max_size, dtype=torch.int64)
        self.slots = torch.zeros(max_size, max_model_len, dtype=torch.int64)
        self.lens = torch.ones(max_size, dtype=torch.int64)
        self.recordings: OrderedDict[int, _Recording] = OrderedDict()
        # why the model's decode steps run eagerly, once a recording was refused (its layers
        # are the same at every size) or a replay failed
        self.refused: str | None = None
        self.replays = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the recordings keep."""
        return sum(r.nbytes for r in self.recordings.values())

    def fits(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` sequences may replay (or record)."""
        return self.refused is None and 1 <= num_seqs <= self.max_size

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: Sequence[int] | np.ndarray,
            slots: Sequence[int] | np.ndarray, seq_lens: Sequence[int] | np.ndarray,
            block_tables: np.ndarray) -> torch.Tensor | None:
        """The hidden states [n, hidden] of a decode step (one token per sequence; arrays as
        for the eager batch, `block_tables` [n, width] padded): a replay where this size is
        recorded, else its recording; None where the recording is refused (the step is then
        the caller's to run eagerly: the torch paths plan their attention from metadata the
        recording does not have). The result is valid until the next call."""
        n = len(seq_lens)
        if not self.fits(n):
            raise ValueError(f"a decode step of {n} sequences does not replay here (1 to "
                             f"{self.max_size}" + (")" if self.refused is None else
                                                   f"; refused: {self.refused})"))
        self._load(input_ids, positions, slots, seq_lens, block_tables)
        recording = self.recordings.get(n)
        if recording is None:
            return self._record(n)
        self.recordings.move_to_end(n)
        profiled = torch.autograd._profiler_enabled()
        try:
            for fn, args in recording.calls:      # (the profiler sees torch's own)
                status = (call_kernel(fn, *args) if profiled and not isinstance(fn, _AtenCall)
                          else fn(*args))
                if status:
                    raise RuntimeError(f"{fn.__name__} returned {status}")
        except Exception as e:      # the step again eagerly (a real error is raised there)
            self.refused = f"{type(e).__name__} replaying: {e}"
            self.recordings.clear()
            logger.warning("decode steps run eagerly on the CPU from now on: %s", self.refused)
            return None
        self.replays += 1
        return recording.output

    def _load(self, input_ids: torch.Tensor, positions: Sequence[int] | np.ndarray,
              slots: Sequence[int] | np.ndarray, seq_lens: Sequence[int] | np.ndarray,
              block_tables: np.ndarray) -> None:
        """Write the step into the static inputs: embeddings, positions, KV slots, and each
        row's context slots (0 past its length: never read) and length."""
        n = len(seq_lens)
        torch.index_select(self.model.model.embed_tokens.weight, 0, input_ids,
                           out=self.hidden[:n])
        self.positions.numpy()[:n] = positions
        self.slot_mapping.numpy()[:n] = slots
        lens = np.asarray(seq_lens, dtype=np.int64)
        longest = int(lens.max())
        j = np.arange(longest)                                        # [L]
        tables = np.asarray(block_tables, dtype=np.int64)             # [n, width]
        ctx = tables[:, j // self.block_size] * self.block_size + j % self.block_size
        ctx[j[None, :] >= lens[:, None]] = 0                          # [n, L]
        self.slots.numpy()[:n, :longest] = ctx
        self.lens.numpy()[:n] = lens

    def _metadata(self, n: int) -> AttentionMetadata:
        """Metadata of a decode step of n rows over the static inputs, its attention plan
        set (the decode kernel reads the rows, slots and lengths)."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:n],
            query_start_loc=torch.arange(n + 1, dtype=torch.int32),
            seq_lens=self.lens[:n].int(), block_tables=torch.zeros(n, 1, dtype=torch.int32),
            query_start_loc_cpu=list(range(n + 1)), seq_lens_cpu=self.lens[:n].tolist(),
            max_query_len=1, max_seq_len=self.max_model_len, block_size=self.block_size,
            shared_prefix_groups=[])
        meta.ref_plan = RefPlan([], self.rows[:n], self.slots[:n], None, [], None,
                                self.lens[:n])
        return meta

    def _record(self, n: int) -> torch.Tensor | None:
        """Run the decoder on the loaded step, recording its kernel calls; keep them if it
        made nothing but those, views and allocations. Returns its hidden states then, else
        None."""
        meta = self._metadata(n)
        try:
            with record_kernel_calls() as calls, _Audit(calls) as audit:
                output = self.model.model.forward_embedded(self.hidden[:n],
                                                           self.positions[:n], self.kv_caches,
                                                           meta)
        except Exception as e:  # a torch path that needs what the recording's metadata lacks
            if not audit.repeated and not audit.foreign:
                raise
            audit.foreign.append(f"{type(e).__name__} in "
                                 f"{(audit.foreign or audit.repeated)[-1]}")
        attends = sum(getattr(fn, "__name__", "") == "decode_attention_bf16" for fn, _ in calls)
        if not audit.foreign and attends != len(self.kv_caches):
            # torch's decode attention plans from metadata a recording does not hold
            audit.foreign.append("decode attention not by the C kernel")
        if audit.foreign:
            self.refused = ", ".join(sorted(set(audit.foreign))[:5])
            self.recordings.clear()
            logger.info("decode steps run eagerly on the CPU: a replay could not repeat %s",
                        self.refused)
            return None
        self.recordings[n] = _Recording(calls, audit.kept, meta, output)
        while len(self.recordings) > 1 and (len(self.recordings) > MAX_GRAPHS
                                            or self.nbytes > MAX_GRAPH_BYTES):
            self.recordings.popitem(last=False)
        logger.debug("recorded a CPU decode step of %d sequences: %d calls, %d of them torch "
                     "operators", n, len(calls), len(audit.repeated))
        return output
