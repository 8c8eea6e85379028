"""Linear layers over 4-bit weights kept as stored: GGUF's Q4_0, Q4_1 and Q4_K on the CPU.

A 4-bit GGUF file (the embedded SmolLM2's is Q4_1) otherwise becomes bf16 when loaded: four
times the memory, and a decode step at batch 1 reads four times the bytes. An `Int4Linear`
holds each projection as 4-bit codes in groups of 32 along the input dimension, each group
with a scale and a min (`w = q * scale + min`, onto which all three GGUF types map exactly:
Q4_0 is `(q - 8) * d`, Q4_1 `q * d + m`, Q4_K `q * (d * sc) - dmin * m` over sub-blocks of
32). The base class loads the weight (shard by shard for fused projections); each subclass
keeps the codes in the layout of the kernel it multiplies with, and `int4_linear_type()`
picks the one this machine runs best:

- `taskloom.ops.int4_vnni.VnniInt4Linear` on CPUs with AVX-512 VNNI (Intel since Cascade
  Lake, AMD since Zen 4): integer dot products against activations quantized to two int8
  parts, for every row count (see that module).
- `TorchInt4Linear` elsewhere: torch's `_weight_int4pack_mm_for_cpu`, which converts every
  code to float and multiplies in float32; it is the faster route up to `kernel_max_rows`
  rows, and above (prefill chunks, large batches) a call unpacks the weight to bf16 and runs
  one dense GEMM. The unpack is a C loop (`csrc/int4_unpack.c`, compiled on first use by
  `taskloom.ops.cpu_native`) or, without a C compiler, a few torch ops: bit for bit the same
  values. Only bf16 activations: torch's kernel is vectorized for them alone (fp16 measured
  50x slower, fp32 24x). Its codes' byte layout depends on the CPU's vector width;
  `int4_layout` finds it once by packing a probe, and where it is none this module knows,
  `int4_supported` says so (and the loader refuses `quantization="gguf"` by name).

On two EPYC (Zen 4) cores, a pass over SmolLM2-135M's projections (66 MB of codes and terms;
`python benchmarks/cpu_linear.py --int4`, in benchmarks/results/2026-12-04-cpu-int4-vnni-
graphs.jsonl) takes 4.1 ms at one row either way (both stream the weights at the memory's
speed; bf16, oneDNN-packed: 13.5), and at 8 / 32 / 128 rows 8.2 / 24 / 82 ms by int8 dot
products against torch's kernel's 11.6 / 42 and its unpack's 108 (bf16: 13.2 / 24 / 72). So a
4-bit model is the faster one for one to some thirty streams and the smaller one always.

Swapped in for the decoder's projections on the meta device, before the weights are read (the
model definition knows nothing of quantization); each module packs itself as soon as its last
shard (q/k/v, gate/up) has arrived, so loading never holds more than one projection unpacked.
"""
from __future__ import annotations

import ctypes
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from taskloom.ops.cpu_native import load_kernel

logger = logging.getLogger(__name__)

INT4_GROUP_SIZE = 32
# Rows up to which a TorchInt4Linear call runs torch's int4 kernel; above, the weight is
# unpacked to bf16 and multiplied densely. Measured over a pass of SmolLM2-135M's projections
# on two Sapphire Rapids cores (`python benchmarks/cpu_linear.py --int4`): with the torch
# unpack, kernel 39 / 78 / 152 ms at 32 / 64 / 128 rows against unpacked 96 / 100 / 106
# (bf16 oneDNN-packed: 14 / 15 / 22); with the C unpack, kernel 39 / 58 / 77 at 32 / 48 / 64
# rows against unpacked 48 / 52 / 54 (and 59 at 128, 179 at 2,048, where bf16 takes 141).
INT4_KERNEL_MAX_ROWS = 64
INT4_KERNEL_MAX_ROWS_NATIVE = 40
INT4_ROWS_MULTIPLE = 16     # torch's int4 packing needs N % 16 == 0


@dataclass
class Int4Weight:
    """A 4-bit weight [rows, cols] as codes and per-group affine terms: `w[r, c] =
    codes[r, c] * scales[r, c // 32] + mins[r, c // 32]` (float32 arithmetic)."""

    codes: torch.Tensor     # [rows, cols] uint8, values 0..15
    scales: torch.Tensor    # [rows, cols // 32] float32
    mins: torch.Tensor      # [rows, cols // 32] float32

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [rows, cols]."""
        rows, cols = self.codes.shape
        q = self.codes.view(rows, cols // INT4_GROUP_SIZE, INT4_GROUP_SIZE).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(rows, cols)

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Int4Weight:
        """The same weight with `fn` applied to the row order of every part (a permutation
        of output rows, such as llama.cpp's q/k permute undone)."""
        return Int4Weight(fn(self.codes), fn(self.scales), fn(self.mins))


@dataclass(frozen=True)
class Int4Layout:
    """How torch's int4 packing lays out codes: row blocks of `block_rows`, each stored per
    input column as `block_rows / 2` bytes, a byte holding two rows' codes (low nibble,
    high nibble): `halves` pairs row d with row d + block_rows/2, otherwise rows 2j and
    2j + 1. A last, shorter block always holds pairs."""

    block_rows: int
    halves: bool


_CANDIDATE_LAYOUTS = (Int4Layout(64, True), Int4Layout(32, True), Int4Layout(32, False),
                      Int4Layout(64, False))


@lru_cache(maxsize=1)
def int4_layout() -> Int4Layout | None:
    """The layout torch's int4 packing uses on this CPU, found by packing a probe (two full
    blocks of the widest candidate and a short one) and unpacking it every known way; None
    when none of them gives the probe back, or this torch has no CPU int4 kernel."""
    pack = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
    if pack is None:
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, 16, (144, 8), generator=gen, dtype=torch.int32)  # [N, K]
    try:
        packed = pack(probe, 1)
    except RuntimeError as e:
        logger.warning("torch's CPU int4 packing fails here (%s): no 4-bit weights", e)
        return None
    for layout in _CANDIDATE_LAYOUTS:
        if packed.shape == (144, 4) and torch.equal(unpack_codes(packed, 8, layout).int(),
                                                    probe):
            return layout
    logger.warning("torch's CPU int4 packing here matches no layout taskloom reads: no "
                   "4-bit weights")
    return None


@lru_cache(maxsize=1)
def native_unpack() -> Callable[..., int] | None:
    """The C unpack (`csrc/int4_unpack.c`), or None where it cannot be built here."""
    lib = load_kernel("int4_unpack")
    if lib is None:
        return None
    fn = lib.int4_unpack_t
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6
    fn.restype = ctypes.c_int
    return fn


def int4_supported(dtype: torch.dtype) -> bool:
    """Whether 4-bit weights can be kept as they are for a CPU model computing in `dtype`
    (bf16, by either kernel)."""
    return dtype == torch.bfloat16 and (int4_linear_type() is not TorchInt4Linear
                                        or int4_layout() is not None)


def unpack_codes(packed: torch.Tensor, cols: int, layout: Int4Layout) -> torch.Tensor:
    """torch's packed int4 weight [rows, cols / 2] uint8 -> its codes [rows, cols] uint8.

    Each nibble is written straight to its place in the row-major result (no intermediate
    of the packed order to transpose afterwards: 15-25% less time than with one)."""
    rows = packed.shape[0]
    flat = packed.reshape(-1)                                # [rows * cols / 2]
    out = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    block = layout.block_rows
    full = rows // block * block
    if full:
        b = flat[:full * cols // 2].view(full // block, cols, block // 2)
        _put_nibbles(b, out[:full].view(full // block, block, cols), layout.halves)
    if rows > full:
        b = flat[full * cols // 2:].view(1, cols, (rows - full) // 2)
        _put_nibbles(b, out[full:].view(1, rows - full, cols), halves=False)
    return out


def _put_nibbles(b: torch.Tensor, dst: torch.Tensor, halves: bool) -> None:
    """Packed bytes b [blocks, cols, block / 2] -> codes dst [blocks, block, cols]: a byte's
    low and high nibbles are rows d and d + block/2 (`halves`) or rows 2d and 2d + 1."""
    blocks, block, cols = dst.shape
    if halves:
        lo, hi = dst[:, :block // 2], dst[:, block // 2:]     # [blocks, block / 2, cols]
    else:
        pairs = dst.view(blocks, block // 2, 2, cols)
        lo, hi = pairs[:, :, 0], pairs[:, :, 1]
    lo.transpose(1, 2).copy_(b & 15)                         # [blocks, cols, block / 2]
    hi.transpose(1, 2).copy_(b >> 4)


class Int4Scratch:
    """One buffer that the 4-bit projections of a model unpack into, one call at a time (a
    model's layers run one after another); it grows to the largest projection's bf16 size."""

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """The buffer's first `numel` elements of `dtype` (contents undefined)."""
        if self._buffer is None or self._buffer.numel() < numel or self._buffer.dtype != dtype:
            self._buffer = torch.empty(numel, dtype=dtype)
        return self._buffer[:numel]


class Int4Linear(nn.Module, ABC):
    """`F.linear(x, w, bias)` over a 4-bit weight w [out_features, in_features]: the loading
    every form shares; each subclass keeps the codes in the layout its kernel reads.

    `weight` holds the codes ([out, in / 2] uint8, two a byte) and the subclass's other
    frozen Parameters the groups' scales and zeros (what counts a model's weights counts
    them). Built from a meta nn.Linear (its bias and shard layout kept) before loading;
    `weight`'s loader takes an `Int4Weight` for the whole projection or for one shard of a
    fused one, and packs once all have come."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % INT4_GROUP_SIZE or out_features % INT4_ROWS_MULTIPLE:
            raise ValueError(f"a 4-bit weight needs in_features % {INT4_GROUP_SIZE} == 0 and "
                             f"out_features % {INT4_ROWS_MULTIPLE} == 0, got "
                             f"[{out_features}, {in_features}]")
        self.out_features, self.in_features = out_features, in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                               device=linear.weight.device), requires_grad=False)
        self.bias = linear.bias
        self.shard_rows: dict[Hashable, tuple[int, int]] = dict(
            getattr(linear.weight, "shard_rows", None) or {None: (0, out_features)})
        self.weight.weight_loader = self._load_shard
        self.weight.shard_ids = getattr(linear.weight, "shard_ids", None)
        self._staged: Int4Weight | None = None
        self._pending: set[Hashable] = set(self.shard_rows)

    @property
    @abstractmethod
    def compute_dtype(self) -> torch.dtype:
        """The dtype of the activations and outputs."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (the values the kernel multiplies by)."""

    @abstractmethod
    def _pack(self, w: Int4Weight) -> None:
        """Write the whole weight `w` into this module's Parameters, in its layout."""

    def _load_shard(self, param: nn.Parameter, loaded: Int4Weight,
                    shard_id: Hashable = None) -> None:
        if not isinstance(loaded, Int4Weight):
            raise ValueError(f"a 4-bit projection takes 4-bit GGUF blocks, got "
                             f"{type(loaded).__name__}")
        if shard_id not in self.shard_rows:
            raise ValueError(f"projection takes shards {list(self.shard_rows)}, got "
                             f"{shard_id!r}")
        offset, rows = self.shard_rows[shard_id]
        if tuple(loaded.shape) != (rows, self.in_features):
            raise ValueError(f"expected shape {(rows, self.in_features)}, got "
                             f"{tuple(loaded.shape)}")
        if self._staged is None:
            groups = self.in_features // INT4_GROUP_SIZE
            self._staged = Int4Weight(
                torch.empty(self.out_features, self.in_features, dtype=torch.uint8),
                torch.empty(self.out_features, groups), torch.empty(self.out_features, groups))
        for dst, src in zip((self._staged.codes, self._staged.scales, self._staged.mins),
                            (loaded.codes, loaded.scales, loaded.mins)):
            dst[offset:offset + rows].copy_(src)
        self._pending.discard(shard_id)
        if not self._pending:
            with torch.no_grad():
                self._pack(self._staged)
            self._staged = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, 4-bit groups of {INT4_GROUP_SIZE}")


class TorchInt4Linear(Int4Linear):
    """An Int4Linear multiplied by torch's int4 kernel: `weight` is torch's packed form of the
    codes and `scales_zeros` [in / 32, out, 2] each group's scale and zero in the compute
    dtype. Calls above `kernel_max_rows` rows unpack the weight to bf16 and run one GEMM."""

    def __init__(self, linear: nn.Linear, scratch: Int4Scratch | None = None) -> None:
        super().__init__(linear)
        self.scratch = Int4Scratch() if scratch is None else scratch
        groups = self.in_features // INT4_GROUP_SIZE
        self.scales_zeros = nn.Parameter(torch.empty(groups, self.out_features, 2,
                                                     device=linear.weight.device),
                                         requires_grad=False)
        # filled with `weight` (llama's check for weights the checkpoint lacked skips it)
        self.scales_zeros.filled_by = "weight"
        self._native: Int4Layout | None | bool = False     # False: not resolved yet

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.scales_zeros.dtype

    @property
    def kernel_max_rows(self) -> int:
        """Rows up to which a call runs torch's int4 kernel rather than unpacking."""
        return (INT4_KERNEL_MAX_ROWS_NATIVE if self._native_layout() is not None
                else INT4_KERNEL_MAX_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= self.kernel_max_rows:
            return self.forward_kernel(x)
        return self.forward_unpacked(x)

    def forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out] through torch's int4 kernel."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(             # [n, out]
            x.contiguous(), self.weight, INT4_GROUP_SIZE, self.scales_zeros)
        return y if self.bias is None else y + self.bias

    def forward_unpacked(self, x: torch.Tensor) -> torch.Tensor:
        """x [n, in] -> [n, out] through the weight unpacked to bf16 and one dense GEMM. The
        C unpack writes into the model's one scratch buffer (`Int4Scratch`): a fresh one a
        call would page-fault its megabytes in every time (2-3x the unpack's time)."""
        scratch = (None if self._native_layout() is None else
                   self.scratch.take(self.in_features * self.out_features,
                                     self.scales_zeros.dtype))
        wt = self.dequantize_t(scratch)                              # [in, out]
        return torch.mm(x, wt) if self.bias is None else torch.addmm(self.bias, x, wt)

    def dequantize(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype (a transposed view)."""
        return self.dequantize_t().t()

    def dequantize_t(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The transposed weight [in, out] in the compute dtype: each value `q * s + (z - 8s)`
        in float32 (a product and a sum, each rounded), rounded to the compute dtype; by the
        C unpack where it runs here (into `out`, in_features * out_features elements, when
        given), else by torch ops (the same bits)."""
        layout = self._native_layout()
        if layout is None:
            return self._dequantize_torch().t()
        shape = (self.in_features, self.out_features)
        wt = (torch.empty(shape, dtype=self.scales_zeros.dtype) if out is None
              else out.view(shape))
        unpack = native_unpack()
        assert unpack is not None                    # _native_layout() found it
        status = unpack(self.weight.data_ptr(), self.scales_zeros.data_ptr(), wt.data_ptr(),
                        self.out_features, self.in_features, INT4_GROUP_SIZE,
                        layout.block_rows, 0, self.out_features // layout.block_rows)
        assert status == 0, f"int4_unpack_t refused {tuple(self.weight.shape)}"
        return wt

    def _native_layout(self) -> Int4Layout | None:
        """The packing layout when the C unpack takes this weight (it reads whole blocks of
        the halves layout, bf16 scales), else None; found on the first call, once the module
        holds its weights in their dtype."""
        if self._native is False:
            layout = int4_layout()
            self._native = (None if layout is None or not layout.halves
                            or self.out_features % layout.block_rows
                            or self.scales_zeros.dtype != torch.bfloat16
                            or native_unpack() is None else layout)
        return self._native

    def _dequantize_torch(self) -> torch.Tensor:
        """The weight [out, in], unpacked by torch ops (what the C unpack computes)."""
        layout = int4_layout()
        assert layout is not None, "Int4Linear is built only where int4_layout() is known"
        codes = unpack_codes(self.weight, self.in_features, layout)   # [out, in] uint8
        groups = self.in_features // INT4_GROUP_SIZE
        scale = self.scales_zeros[..., 0].t().float().unsqueeze(-1)   # [out, groups, 1]
        offset = self.scales_zeros[..., 1].t().float().unsqueeze(-1) - 8 * scale
        w = codes.view(self.out_features, groups, INT4_GROUP_SIZE).float()
        return w.mul_(scale).add_(offset).to(self.scales_zeros.dtype).view(
            self.out_features, self.in_features)

    def _pack(self, w: Int4Weight) -> None:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.codes.int(), 1)
        self.weight.copy_(packed.view(self.weight.shape))
        # w = q * s + m = (q - 8) * s + (m + 8 s): the kernel's zero, in float32 first
        zeros = w.mins + 8 * w.scales                              # [out, groups]
        self.scales_zeros.copy_(torch.stack((w.scales, zeros), dim=-1).transpose(0, 1))


def int4_linear_type() -> type[Int4Linear]:
    """The 4-bit linear this machine runs best: `VnniInt4Linear` (int8 dot products, 2.7-3.9x
    torch's kernel) where its C kernel builds with AVX-512 VNNI and the C kernels are on,
    else `TorchInt4Linear`."""
    from taskloom.ops.int4_vnni import VnniInt4Linear, vnni_available
    return VnniInt4Linear if vnni_available() else TorchInt4Linear


def swap_int4_linears(model: nn.Module, names: set[str],
                      kind: type[Int4Linear] | None = None) -> int:
    """Replace the (meta) nn.Linear submodules of `model` named in `names` (e.g.
    `model.layers.0.mlp.down_proj`) with 4-bit linears of type `kind` (default
    `int4_linear_type()`; TorchInt4Linear modules share one scratch buffer); returns how
    many."""
    kind = int4_linear_type() if kind is None else kind
    scratch = Int4Scratch()
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, attr)
        if type(linear) is not nn.Linear:
            raise ValueError(f"{name} is a {type(linear).__name__}, not a linear layer")
        setattr(parent, attr, TorchInt4Linear(linear, scratch) if kind is TorchInt4Linear
                else kind(linear))
    return len(names)
