"""Linear layers whose weights are prepacked for oneDNN: the CPU's bf16/fp16 GEMMs.

`F.linear` on a CPU bf16 weight hands oneDNN a plain row-major matrix on every call, to
reorder or to read in a layout its kernels do not want; reordered once, it is read as they
want it. At decode batch sizes that is most of the difference: on two Sapphire Rapids cores
(AMX) a pass over SmolLM2-135M's decoder projections streams 11-12 GB/s of bf16 weights
through `F.linear` and 14-17 GB/s from weights reordered once, 1.3-1.5x from 1 to 256 rows;
at 1,024-2,048 rows (long prefill chunks) the two are within 10% of each other
(`python benchmarks/cpu_linear.py`). fp16 gains less (no AMX for it there) but loses
nothing. The packed GEMM computes what `F.linear` computes, the same oneDNN kernels without
the per-call reorder: equal bit for bit in most shapes, otherwise within a rounding of the
output dtype (tests/ops/test_packed_linear.py).

Swapped in for the decoder's projections after the weights are loaded, as quantized linears
would be (the model definition knows of neither). fp32 keeps `F.linear`: it is the oracle,
and at one row oneDNN's packed fp32 GEMV measured slower than F.linear's (MKL's). The lm
head stays as it is: with tied embeddings a packed copy would double the vocabulary matrix,
for 1.2-2 ms of SmolLM2's 25-62 ms decode steps (measured).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The batch size oneDNN lays the packed weight out for. Measured on SmolLM2-135M's shapes
# (2 cores, AMX): with 512, 1-256 rows run 1.3-1.5x F.linear and 1,024-2,048 about as fast;
# a hint of 16 halved the speed at 1,024 rows, one of 2,048 lost at 64-256.
PACK_BATCH_HINT = 512


def packing_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build and CPU run oneDNN's packed GEMM natively in `dtype`."""
    if not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return False


class PackedLinear(nn.Module):
    """`F.linear(x, weight, bias)` over a weight reordered once into oneDNN's layout.

    x: [n, in_features] (2-D: the model's batches are flat) -> [n, out_features]. Holds the
    packed weight only: `weight` is that opaque tensor (dtype, device and shape as the
    original's, no storage to index), a frozen Parameter as nn.Linear's is, so that what
    counts a model's weights (parameter totals, a decode step's bytes, prefill FLOPs) still
    counts it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        if weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"PackedLinear packs a 2-D CPU weight, got {tuple(weight.shape)} "
                             f"on {weight.device}")
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
        self.weight = nn.Parameter(packed, requires_grad=False)            # [out, in], opaque
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias,  # [n, out]
                                                  "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed for oneDNN")


def pack_cpu_linears(model: nn.Module) -> int:
    """Replace every decoder layer's nn.Linear projections of a loaded CPU model held in bf16
    or fp16 with PackedLinear modules, where oneDNN supports the dtype here; returns how
    many were packed (0: the model is left as it is). Projections of other kinds (4-bit
    ones) are left as they are."""
    layers = model.model.layers
    embed = model.model.embed_tokens.weight             # the model's dtype and device
    if embed.device.type != "cpu" or not packing_supported(embed.dtype):
        return 0
    count = 0
    for layer in layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, PackedLinear(child.weight, child.bias))
                    count += 1
    logger.info("CPU linears: %d projections packed for oneDNN (%s)", count, embed.dtype)
    return count
