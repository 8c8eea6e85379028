"""Kernels: each op of a decoder layer timed alone at a model's shapes, with what it moves or
computes per call against the device's copy bandwidth or a large matrix product, and, for the
Triton ops, how far its output is from the torch reference's. With `--sweep` the attention
kernels are also timed at other launch settings (keys per tile, warps, pipeline stages), each
checked against the default's output: what a device run needs to choose them, and to say which
op keeps a step from the hardware's limit.

The ops, with one token per sequence at each of `--batch-sizes` (decode) and at
`--prefill-tokens` (a prefill chunk):
  linear_qkv, linear_o, linear_gate_up, linear_down, lm_head: torch's matmul (cuBLAS) with the
      layer's weight shapes; bytes: the weight and the activations. On a CPU in bf16/fp16 the
      decoder's projections also as the engine runs them there, oneDNN-packed
      (`weights: "packed"`, checked against F.linear, `weights: "plain"`);
  fused_add_rms_norm, rotary, write_kv, rotary_to_cache (the two fused, as the model runs
      them), silu_and_mul: the bytes they read and write;
  decode_attention at each of `--context-lens`: every sequence's keys and values, in blocks
      scattered over the pool, split as an eager step splits them ("auto") and as a CUDA graph
      captured for `--max-model-len` does ("graph");
  extend_attention: `--prefill-tokens` of new prompts of `--prompt-len` tokens, causal; FLOP/s.

On CUDA each time is `triton.testing.do_bench`'s median, which flushes the L2 cache between
calls (a layer's weights and KV are not in L2 when a real step reaches them); on a CPU the
median of `--repeats` calls.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from taskloom.bench.common import run_info, significant
from taskloom.bench.latency import copy_bandwidth, matmul_flops
from taskloom.models.arch import ArchConfig
from taskloom.models.loader import random_arch
from taskloom.ops.backend import TORCH_OPS, Ops, select_ops, triton_ops
from taskloom.ops.linear import PackedLinear, packing_supported
from taskloom.ops.rotary import RotaryEmbedding
from taskloom.runtime.attention import AttentionMetadata
from taskloom.runtime.dtypes import check_device, torch_dtype

# --sweep: the launch settings tried for each attention kernel, beside its default (each
# distinct one is a compilation: about 27 per decode split count, 54 for extend)
SWEEP_BLOCK_N = (32, 64, 128)
SWEEP_WARPS = (2, 4, 8)
SWEEP_STAGES = (None, 2, 4)           # None: Triton's default (3 on sm_90)
SWEEP_BLOCK_ROWS = (64, 128)          # extend: query rows of a program


@dataclass
class Case:
    """One timed call: the op, the shape it ran at, and what one call moves or computes."""

    op: str
    shape: dict[str, Any]
    fn: Callable[[], Any]
    nbytes: int = 0                   # bytes read and written (memory-bound ops)
    flops: int = 0                    # FLOPs (extend attention)
    reference: Callable[[], Any] | None = None   # the torch reference's call, to compare
    reference_is_op: bool = True      # the reference is the torch op itself (no comparison
                                      # when the torch ops are what is timed)
    view: Callable[[Any], torch.Tensor] = lambda out: out   # an output as one tensor


def _flat(outs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.flatten() for t in outs])


def _rand(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def _kv_pool(arch: ArchConfig, num_tokens: int, block_size: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    blocks = -(-num_tokens // block_size) + 1
    shape = (2, blocks, block_size, arch.num_key_value_heads, arch.head_dim)
    return _rand(*shape, dtype=dtype, device=device)


def _scattered_tables(num_seqs: int, blocks_per_seq: int, num_blocks: int,
                      device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Block tables [num_seqs, blocks_per_seq] over a random permutation of the pool's
    blocks 1.. (block 0 is the padding block), as a pool in use has them."""
    order = torch.randperm(num_blocks - 1, generator=gen)[:num_seqs * blocks_per_seq] + 1
    return order.view(num_seqs, blocks_per_seq).to(torch.int32).to(device)


def _metadata(query_lens: list[int], seq_lens: list[int], tables: torch.Tensor,
              block_size: int, device: torch.device, num_splits: int | None = None
              ) -> AttentionMetadata:
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    slots = []
    table_rows = tables.tolist()
    for row, (q, s) in zip(table_rows, zip(query_lens, seq_lens)):
        slots += [row[p // block_size] * block_size + p % block_size for p in range(s - q, s)]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables, query_start_loc_cpu=qsl, seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), block_size=block_size,
        decode_num_splits=num_splits)


def layer_cases(arch: ArchConfig, ops: Ops, dtype: torch.dtype, device: torch.device,
                tokens: int, phase: str) -> list[Case]:
    """The layer's ops other than attention (and the LM head) for `tokens` tokens."""
    isz = dtype.itemsize
    h, inter = arch.hidden_size, arch.intermediate_size
    q_size, kv_size = arch.q_size, arch.kv_size
    shape = {"phase": phase, "tokens": tokens}
    cases = []
    for name, n_in, n_out in (("linear_qkv", h, q_size + 2 * kv_size), ("linear_o", q_size, h),
                              ("linear_gate_up", h, 2 * inter), ("linear_down", inter, h),
                              ("lm_head", h, arch.vocab_size)):
        if name == "lm_head" and phase != "decode":
            continue                # a prefill samples one row per sequence
        x = _rand(tokens, n_in, dtype=dtype, device=device)
        w = _rand(n_out, n_in, dtype=dtype, device=device)
        nbytes = (n_out * n_in + tokens * (n_in + n_out)) * isz
        if name == "lm_head" or device.type != "cpu" or not packing_supported(dtype):
            cases.append(Case(name, shape, lambda x=x, w=w: F.linear(x, w), nbytes=nbytes))
            continue
        cases.append(Case(name, {**shape, "weights": "plain"}, lambda x=x, w=w: F.linear(x, w),
                          nbytes=nbytes))
        cases.append(Case(name, {**shape, "weights": "packed"}, partial(PackedLinear(w, None), x),
                          nbytes=nbytes, reference=lambda x=x, w=w: F.linear(x, w),
                          reference_is_op=False))
    x = _rand(tokens, h, dtype=dtype, device=device)
    res = _rand(tokens, h, dtype=dtype, device=device)
    w = _rand(h, dtype=dtype, device=device)
    eps = arch.rms_norm_eps

    # bytes: x and the residual read, the output and the new residual written, the weight
    cases.append(Case("fused_add_rms_norm", shape,
                      lambda: ops.fused_add_rms_norm(x, res, w, eps),
                      nbytes=(4 * tokens * h + h) * isz,
                      reference=lambda: TORCH_OPS.fused_add_rms_norm(x, res, w, eps),
                      view=_flat))
    positions = torch.randint(0, arch.max_position_embeddings, (tokens,), device=device)
    q = _rand(tokens, arch.num_attention_heads, arch.head_dim, dtype=dtype, device=device)
    k = _rand(tokens, arch.num_key_value_heads, arch.head_dim, dtype=dtype, device=device)

    def rotate(impl: Ops) -> Callable[[], Any]:
        rot = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                              arch.rope_scaling, arch.rope_freq_factors, rotate=impl.rotary)
        return lambda: rot(positions, q, k)

    # bytes: q and k read and written, a float32 cos/sin row per token
    cases.append(Case("rotary", shape, rotate(ops),
                      nbytes=2 * (q.numel() + k.numel()) * isz + tokens * arch.head_dim * 4,
                      reference=rotate(TORCH_OPS), view=_flat))
    block_size = 16
    slots = torch.randperm(tokens, device=device) + block_size      # block 0 left out
    v = _rand(*k.shape, dtype=dtype, device=device)

    pool = _kv_pool(arch, tokens, block_size, dtype, device)

    def write(impl: Ops) -> Callable[[], Any]:
        cache = pool.clone()            # one each: both write

        def call() -> torch.Tensor:
            impl.write_kv_cache(k, v, cache, slots)
            return cache
        return call

    cases.append(Case("write_kv", shape, write(ops), nbytes=4 * k.numel() * isz,
                      reference=write(TORCH_OPS),
                      view=torch.flatten))

    def rotate_to_cache(impl: Ops) -> Callable[[], Any]:
        rot = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings, arch.rope_theta,
                              arch.rope_scaling, arch.rope_freq_factors,
                              rotate_to_cache=impl.rotary_to_cache)
        cache = pool.clone()

        def call() -> tuple[torch.Tensor, torch.Tensor]:
            return rot.to_cache(positions, q, k, v, cache, slots), cache
        return call

    # what the model runs: rotary and the KV write in one launch; bytes: q, k, v read, the
    # rotated q written, k and v stored, a float32 cos/sin row per token
    cases.append(Case("rotary_to_cache", shape, rotate_to_cache(ops),
                      nbytes=2 * (q.numel() + 2 * k.numel()) * isz + tokens * arch.head_dim * 4,
                      reference=rotate_to_cache(TORCH_OPS), view=_flat))
    gate_up = _rand(tokens, 2 * inter, dtype=dtype, device=device)
    cases.append(Case("silu_and_mul", shape, lambda: ops.silu_and_mul(gate_up),
                      nbytes=3 * tokens * inter * isz,
                      reference=lambda: TORCH_OPS.silu_and_mul(gate_up)))
    return cases


def decode_cases(arch: ArchConfig, ops: Ops, dtype: torch.dtype, device: torch.device,
                 batch: int, context: int, max_model_len: int, block_size: int,
                 gen: torch.Generator) -> list[Case]:
    """Decode attention of `batch` sequences of `context` tokens, splits as an eager step and
    as a CUDA graph has them."""
    heads, kv_heads, d = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    blocks_per_seq = -(-context // block_size)
    cache = _kv_pool(arch, batch * blocks_per_seq * block_size, block_size, dtype, device)
    tables = _scattered_tables(batch, blocks_per_seq, cache.shape[1], device, gen)
    q = _rand(batch, heads, d, dtype=dtype, device=device)
    scale = d ** -0.5
    nbytes = (batch * context * kv_heads * d * 2 + 2 * batch * heads * d) * dtype.itemsize
    cases = []
    for splits in ("auto", "graph"):
        num_splits = None
        if splits == "graph" and ops.name == "triton":
            from taskloom.ops.triton.decode_attention import decode_num_splits
            num_splits = decode_num_splits(batch, kv_heads, max_model_len)
        elif splits == "graph":
            continue                # the torch reference is never captured
        meta = _metadata([1] * batch, [context] * batch, tables, block_size, device,
                         num_splits)
        ref_meta = _metadata([1] * batch, [context] * batch, tables, block_size, device)
        cases.append(Case(
            "decode_attention", {"phase": "decode", "batch": batch, "context": context,
                                 "splits": splits if num_splits is None else num_splits},
            lambda meta=meta: ops.paged_attention(q, cache, meta, scale), nbytes=nbytes,
            reference=lambda m=ref_meta: TORCH_OPS.paged_attention(q, cache, m, scale)))
    return cases


def extend_case(arch: ArchConfig, ops: Ops, dtype: torch.dtype, device: torch.device,
                tokens: int, prompt_len: int, block_size: int, gen: torch.Generator) -> Case:
    """Causal attention of `tokens // prompt_len` new prompts of `prompt_len` tokens."""
    heads, d = arch.num_attention_heads, arch.head_dim
    num_seqs = max(1, tokens // prompt_len)
    blocks_per_seq = -(-prompt_len // block_size)
    cache = _kv_pool(arch, num_seqs * blocks_per_seq * block_size, block_size, dtype, device)
    tables = _scattered_tables(num_seqs, blocks_per_seq, cache.shape[1], device, gen)
    meta = _metadata([prompt_len] * num_seqs, [prompt_len] * num_seqs, tables, block_size,
                     device)
    q = _rand(num_seqs * prompt_len, heads, d, dtype=dtype, device=device)
    scale = d ** -0.5
    flops = 4 * heads * d * num_seqs * prompt_len * (prompt_len + 1) // 2
    return Case("extend_attention", {"phase": "prefill", "seqs": num_seqs,
                                     "prompt_len": prompt_len},
                lambda: ops.paged_attention(q, cache, meta, scale), flops=flops,
                reference=lambda: TORCH_OPS.paged_attention(q, cache, meta, scale))


def time_call(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Seconds per call: do_bench's median on CUDA (L2 flushed between calls), else the
    median of `repeats` calls after one warm-up."""
    if device.type == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=40, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def measure(case: Case, device: torch.device, repeats: int, bandwidth: float, flops: float,
            compare_with: Any = None) -> tuple[dict[str, Any], Any]:
    """The result line of one case, and its output (to compare other settings with)."""
    out = case.fn()
    seconds = time_call(case.fn, device, repeats)
    row: dict[str, Any] = {"op": case.op, **case.shape, "us": significant(seconds * 1e6)}
    if case.nbytes:
        row["gb_per_s"] = significant(case.nbytes / seconds / 1e9)
        row["fraction_of_copy_bandwidth"] = round(case.nbytes / seconds / bandwidth, 3)
    if case.flops:
        row["tflops"] = significant(case.flops / seconds / 1e12)
        row["fraction_of_matmul_flops"] = round(case.flops / seconds / flops, 3)
    if compare_with is not None:
        row["max_abs_diff_vs_default"] = significant(
            _max_abs_diff(case.view(out), case.view(compare_with)))
    elif case.reference is not None:
        row["max_abs_diff_vs_torch"] = significant(
            _max_abs_diff(case.view(out), case.view(case.reference())))
    return row, out


@contextlib.contextmanager
def launch_settings(kernel: str, block_n: int | None, num_warps: int,
                    num_stages: int | None, block_rows: int | None = None) -> Iterator[None]:
    """Launch `kernel`'s Triton kernels ("decode" or "extend") with these settings while in
    the block (see taskloom.ops.triton.paged_kv.TileConfig)."""
    from taskloom.ops.triton import decode_attention, extend_attention
    from taskloom.ops.triton.paged_kv import TileConfig
    module, name = ((decode_attention, "DECODE_TILES") if kernel == "decode"
                    else (extend_attention, "EXTEND_TILES"))
    saved, saved_rows = getattr(module, name), extend_attention.BLOCK_ROWS
    setattr(module, name, TileConfig(block_n, num_warps, num_stages))
    if block_rows is not None:
        extend_attention.BLOCK_ROWS = block_rows
    try:
        yield
    finally:
        setattr(module, name, saved)
        extend_attention.BLOCK_ROWS = saved_rows


def sweep_settings(kernel: str) -> list[dict[str, Any]]:
    """The launch settings `--sweep` tries for `kernel`."""
    rows = SWEEP_BLOCK_ROWS if kernel == "extend" else (None,)
    return [{"block_n": n, "num_warps": w, "num_stages": s, "block_rows": r}
            for n, w, s, r in itertools.product(SWEEP_BLOCK_N, SWEEP_WARPS, SWEEP_STAGES, rows)]


def run_sweep(case: Case, default_row: dict[str, Any], default_out: Any,
              device: torch.device, repeats: int, bandwidth: float, flops: float,
              deadline: float = float("inf")) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every setting of the case's kernel until `deadline` (time.monotonic): its rows (or
    the error that stopped it), and the fastest against the default."""
    kernel = "decode" if case.op == "decode_attention" else "extend"
    rows = []
    settings = sweep_settings(kernel)
    for setting in settings:
        if time.monotonic() > deadline:
            break
        label = {k: v for k, v in setting.items() if v is not None}
        try:
            with launch_settings(kernel, **setting):
                row, _ = measure(case, device, repeats, bandwidth, flops, default_out)
        except Exception as e:      # a setting the compiler refuses (shared memory, ...)
            row = {"op": case.op, **case.shape, "error": f"{type(e).__name__}: {e}"[:200]}
        rows.append({**row, "launch": label})
    timed = [r for r in rows if "us" in r]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    summary = {"op": case.op, **case.shape, "default_us": default_row["us"],
               "settings_timed": len(timed), "settings": len(settings),
               "best_launch": best["launch"] if best else None,
               "best_us": best["us"] if best else None,
               "speedup": round(default_row["us"] / best["us"], 3) if best else None}
    return rows, summary


def run_kernels(a: argparse.Namespace) -> dict[str, Any]:
    device = check_device(a.device)     # a GPU this machine lacks: named, not a traceback
    dtype = torch_dtype(a.dtype)
    arch, _ = random_arch(a.model)
    try:
        ops = {"auto": lambda: select_ops(device), "torch": lambda: TORCH_OPS,
               "triton": triton_ops}[a.ops]()
    except ImportError as e:
        raise ValueError(f"--ops triton needs Triton, which does not import here ({e})") from e
    if a.sweep and ops.name != "triton":
        raise ValueError("--sweep times the Triton kernels' launch settings: it needs the "
                         "Triton ops (a CUDA device, or --ops triton under TRITON_INTERPRET=1)")
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device, nbytes=1 << 30 if device.type == "cuda" else 1 << 26)
    flops = matmul_flops(device, dtype)
    cases = []
    with torch.inference_mode():
        for b in a.batch_sizes:
            cases += layer_cases(arch, ops, dtype, device, b, "decode")
            for ctx in a.context_lens:
                cases += decode_cases(arch, ops, dtype, device, b, ctx, a.max_model_len,
                                      a.block_size, gen)
        for t in a.prefill_tokens:
            cases += layer_cases(arch, ops, dtype, device, t, "prefill")
            cases.append(extend_case(arch, ops, dtype, device, t, a.prompt_len,
                                     a.block_size, gen))
        if ops is TORCH_OPS:
            for case in cases:
                if case.reference_is_op:
                    case.reference = None   # they are the reference
        results, sweeps, best = [], [], []
        deadline = time.monotonic() + a.sweep_budget
        for case in cases:
            row, out = measure(case, device, a.repeats, bandwidth, flops)
            results.append(row)
            # decode: the split count a CUDA graph has (eager decode steps are the fewer)
            if a.sweep and (case.op == "extend_attention" or (
                    case.op == "decode_attention" and case.shape["splits"] != "auto")):
                rows, summary = run_sweep(case, row, out, device, a.repeats, bandwidth, flops,
                                          deadline)
                sweeps += rows
                best.append(summary)
            del out
    result: dict[str, Any] = {
        "bench": "kernels", "model": a.model, "dtype": a.dtype, "ops": ops.name,
        "block_size": a.block_size, "max_model_len": a.max_model_len,
        "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
        "matmul_tflops": significant(flops / 1e12), "results": results}
    if ops.name == "triton":
        result["default_launch"] = default_launches()
    if a.sweep:
        result["sweep"] = sweeps
        result["best"] = best
    return {**result, **run_info(a.device)}


def default_launches() -> dict[str, Any]:
    """The attention kernels' launch settings now (for the record)."""
    from taskloom.ops.triton import decode_attention, extend_attention
    return {"decode": asdict(decode_attention.DECODE_TILES),
            "extend": {**asdict(extend_attention.EXTEND_TILES),
                       "block_rows": extend_attention.BLOCK_ROWS}}
