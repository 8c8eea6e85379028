"""A whole decoder's projections on the CPU, through `F.linear` and oneDNN-packed
(`taskloom.ops.linear.PackedLinear`, what the engine runs in bf16/fp16 on a CPU), at several
row counts: one pass over every layer's q/k/v, o, gate/up and down weights of a named shape,
each weight a matrix of its own, so that (unlike `taskloom bench kernels`, which reuses one)
they stream from memory as a decode step's do. Prints a JSON line: per rows and kind, the
median milliseconds of a pass over the repeats, the weight bytes a second (GB/s) and the
TFLOP/s, and packed's speedup over F.linear; and the packed outputs' largest difference from
F.linear's. With --int4 (bf16), also 4-bit weights (random codes) every way the engine may
multiply them: `taskloom.ops.int4_linear.TorchInt4Linear`'s torch int4 kernel (`int4_kernel`)
and its unpack to bf16 then one GEMM (`int4_unpacked`: the C unpack where it builds here),
which it takes up to and above its `kernel_max_rows` rows; and, on a CPU with AVX-512 VNNI,
`taskloom.ops.int4_vnni.VnniInt4Linear`'s int8 dot products (`int4_vnni`, every row count),
which the engine runs there (GB/s of the 4-bit bytes). With --head (bf16), also the shape's
lm head [vocab, hidden] each way the engine may run it: `F.linear` (`head_f_linear`), and
the small-batch head's C loop (`taskloom.ops.small_linear`) over bf16 weights
(`head_small_bf16`) and over a Q8_0 head kept 8-bit (`head_small_q8`, random codes; GB/s of
its 8-bit bytes), speedup over F.linear.
With --small (bf16), also the decoder's projections through that C loop (`small`: the
engine runs it for lm heads only, and this measures what it would do for the projections).

    python benchmarks/cpu_linear.py --model smollm2-135m --rows 1 8 32 256 2048
    python benchmarks/cpu_linear.py --int4 --rows 1 4 8 16 32 64 128 256 2048
    python benchmarks/cpu_linear.py --head --rows 1 2 4 8 16 32 64
    python benchmarks/cpu_linear.py --small --rows 1 2 4 8 16
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from taskloom.bench.common import run_info, significant
from taskloom.models.loader import random_arch
from taskloom.models.weights import materialize
from taskloom.ops.int4_linear import (INT4_GROUP_SIZE, Int4Linear, Int4Scratch, Int4Weight,
                                      TorchInt4Linear, int4_supported)
from taskloom.ops.int4_vnni import VnniInt4Linear, library
from taskloom.ops.linear import PACK_BATCH_HINT, PackedLinear, packing_supported
from taskloom.ops.small_linear import Q8_GROUP, SMALL_BATCH_MAX_ROWS, Q8Weight, SmallBatchHead
from taskloom.runtime.dtypes import torch_dtype


def decoder_weights(model: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """Every layer's projection weights [out, in] of the named shape, random."""
    arch, _ = random_arch(model)
    h, inter = arch.hidden_size, arch.intermediate_size
    shapes = [(arch.q_size + 2 * arch.kv_size, h), (h, arch.q_size), (2 * inter, h),
              (h, inter)]
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(o, i, generator=gen) / i ** 0.5).to(dtype)
            for _ in range(arch.num_hidden_layers) for o, i in shapes]


def int4_linears(weights: list[torch.Tensor], kind: type[Int4Linear]) -> list[Int4Linear]:
    """A 4-bit linear of `kind` of each weight's shape, random codes (what is timed is the
    same)."""
    gen = torch.Generator().manual_seed(1)
    scratch = Int4Scratch()                  # one for the whole model, as the loader's swap
    layers = []
    for w in weights:
        rows, cols = w.shape
        with torch.device("meta"):
            linear = torch.nn.Linear(cols, rows, bias=False)
            layer = (TorchInt4Linear(linear, scratch) if kind is TorchInt4Linear
                     else kind(linear))
        materialize(layer, torch.bfloat16, torch.device("cpu"))
        groups = cols // INT4_GROUP_SIZE
        scales = torch.full((rows, groups), 1 / (8 * cols ** 0.5))
        layer.weight.weight_loader(layer.weight, Int4Weight(
            torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8),
            scales, -8 * scales), None)
        layers.append(layer)
    return layers


def int4_calls(layers: list[TorchInt4Linear], vnni: list[VnniInt4Linear],
               xs: dict[int, torch.Tensor]) -> dict[str, list[Callable[[], torch.Tensor]]]:
    """A pass over `layers` through torch's int4 kernel, and through unpacking + F.linear;
    and over `vnni` (where there are) through the int8 dot products."""
    calls = {"int4_kernel": [lambda m=m: m.forward_kernel(xs[m.in_features]) for m in layers],
             "int4_unpacked": [lambda m=m: m.forward_unpacked(xs[m.in_features])
                               for m in layers]}
    if vnni:
        calls["int4_vnni"] = [lambda m=m: m(xs[m.in_features]) for m in vnni]
    return calls


def heads(model: str) -> tuple[torch.Tensor, SmallBatchHead, SmallBatchHead]:
    """The named shape's lm head [vocab, hidden] of random Q8_0 codes: its bf16 values, and
    a small-batch head over those and over the codes."""
    arch, _ = random_arch(model)
    gen = torch.Generator().manual_seed(2)
    vocab, hidden = arch.vocab_size, arch.hidden_size
    weight = Q8Weight(torch.randint(-127, 128, (vocab, hidden), generator=gen,
                                    dtype=torch.int8),
                      torch.rand(vocab, hidden // Q8_GROUP, generator=gen) / 127)
    w = weight.dequantize().bfloat16()
    return w, SmallBatchHead(w), SmallBatchHead(weight)


def head_results(w: torch.Tensor, small_bf16: SmallBatchHead, small_q8: SmallBatchHead,
                 rows: int, repeats: int) -> list[dict]:
    """The lm head at `rows` rows, each way."""
    x = torch.randn(rows, w.shape[1]).bfloat16()
    kinds = {"head_f_linear": (lambda: F.linear(x, w), w.numel() * w.element_size()),
             "head_small_bf16": (lambda: small_bf16(x), small_bf16.nbytes),
             "head_small_q8": (lambda: small_q8(x), small_q8.nbytes)}
    seconds = {k: time_pass([call], repeats) for k, (call, _) in kinds.items()}
    return [{"rows": rows, "weights": k, "ms": significant(seconds[k] * 1e3),
             "gb_per_s": significant(size / seconds[k] / 1e9),
             "tflops": significant(2 * rows * w.numel() / seconds[k] / 1e12),
             "speedup": round(seconds["head_f_linear"] / seconds[k], 3)}
            for k, (_, size) in kinds.items()]


def time_pass(calls: list[Callable[[], torch.Tensor]], repeats: int) -> float:
    """Median seconds of one pass over `calls`, after a warm-up pass."""
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="a named shape")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 256, 2048])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--int4", action="store_true",
                   help="also time 4-bit weights (bf16 activations) both ways")
    p.add_argument("--small", action="store_true",
                   help="also time the projections through the small-batch head's C loop")
    p.add_argument("--head", action="store_true",
                   help="also time the lm head by F.linear and the small-batch head's C loop "
                        "(bf16, and Q8_0 kept 8-bit)")
    a = p.parse_args()
    dtype = torch_dtype(a.dtype)
    if not packing_supported(dtype):
        raise SystemExit(f"oneDNN on this CPU has no native {a.dtype} GEMM: nothing to compare")
    weights = decoder_weights(a.model, dtype)
    packed = [PackedLinear(w, None) for w in weights]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    if a.int4 and not int4_supported(dtype):
        raise SystemExit(f"no 4-bit weights with {a.dtype} activations on this CPU")
    int4 = int4_linears(weights, TorchInt4Linear) if a.int4 else []
    vnni = int4_linears(weights, VnniInt4Linear) if a.int4 and library() is not None else []
    int4_bytes = sum(p.numel() * p.element_size() for m in int4 for p in m.parameters())
    if (a.head or a.small) and dtype != torch.bfloat16:
        raise SystemExit("the small-batch head takes bfloat16 activations")
    small = [SmallBatchHead(w) for w in weights] if a.small else []
    head = heads(a.model) if a.head else None
    results, max_diff = [], 0.0
    with torch.inference_mode():
        for rows in a.rows:
            xs = {k: torch.randn(rows, k).to(dtype) for k in {w.shape[1] for w in weights}}
            plain = [lambda w=w: F.linear(xs[w.shape[1]], w) for w in weights]
            pack = [lambda m=m, k=w.shape[1]: m(xs[k]) for m, w in zip(packed, weights)]
            for w, m in zip(weights[:4], packed[:4]):
                x = xs[w.shape[1]]
                max_diff = max(max_diff, float((m(x).float() - F.linear(x, w).float())
                                               .abs().max()))
            flops = 2 * rows * nbytes / dtype.itemsize
            seconds = {}
            kinds = {"plain": plain, "packed": pack,
                     **(int4_calls(int4, vnni, xs) if int4 else {})}
            if small:
                kinds["small"] = [lambda m=m: m(xs[m.in_features]) for m in small]
            for kind, calls in kinds.items():
                seconds[kind] = time_pass(calls, max(2, a.repeats // max(1, rows // 256)))
                size = int4_bytes if kind.startswith("int4") else nbytes
                results.append({"rows": rows, "weights": kind,
                                "ms": significant(seconds[kind] * 1e3),
                                "gb_per_s": significant(size / seconds[kind] / 1e9),
                                "tflops": significant(flops / seconds[kind] / 1e12),
                                "speedup": round(seconds["plain"] / seconds[kind], 3)})
            if head is not None:
                results += head_results(*head, rows, max(5, a.repeats))
    print(json.dumps({"bench": "cpu_linear", "model": a.model, "dtype": a.dtype,
                      "threads": torch.get_num_threads(), "pack_batch_hint": PACK_BATCH_HINT,
                      "int4_kernel_max_rows": int4[0].kernel_max_rows if int4 else None,
                      "small_batch_max_rows": SMALL_BATCH_MAX_ROWS if head else None,
                      "weight_bytes": nbytes, "results": results,
                      "max_abs_diff_vs_f_linear": significant(max_diff), **run_info("cpu")}))


if __name__ == "__main__":
    main()
