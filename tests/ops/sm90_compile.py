"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter tests check what the kernels compute, but the interpreter accepts programs
that the compiler refuses (a loop-carried value changing dtype, a `tl.dot` tile under 16, a
non-constexpr shape) and says nothing of registers or shared memory. This module runs each op's
Python wrapper, as the model calls it, with the shapes of the named models, while a
compile-only Triton driver turns every launch into an ahead-of-time compilation for sm_90 (with
the ptxas that Triton ships). Each compiled specialisation is reported with its shared memory,
registers and spilled (local) bytes, read from the cubin by Triton's bundled cuobjdump.

Run it in a process where Triton is not in interpreter mode (the test suite's conftest turns
that on; tests/ops/test_triton_sm90_compile.py starts this module in a subprocess):

    TRITON_INTERPRET=0 python -m tests.ops.sm90_compile [--shapes NAME ...] [--dtypes ...]

It prints one JSON object per compiled kernel. The kernels' outputs are left unwritten: only
the launches matter here.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.driver import driver
from triton.runtime.jit import KernelInterface

from taskloom.lora.metadata import LoRAMetadata, build_lora_metadata
from taskloom.models.arch import ArchConfig
from taskloom.config import AttentionWindow
from taskloom.models.shapes import SHAPES, shape_config
from taskloom.ops.backend import Ops, triton_ops
from taskloom.ops.rotary import RotaryEmbedding
from taskloom.runtime.shared_prefix import shared_prefix_groups
from taskloom.runtime.attention import set_tree_masks, tree_bits
from tests.models.single_seq import make_metadata

H100 = GPUTarget("cuda", 90, 32)
# Shared memory one block may use on an H100 (227 KiB of the SM's 228).
H100_MAX_SHARED = 232448
BLOCK_SIZE = 16
LORA_RANK = 16
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Launch:
    """One kernel specialisation compiled for sm_90."""

    kernel: str
    constexprs: dict[str, Any]
    num_warps: int
    shared: int       # bytes of shared memory per block
    registers: int    # per thread
    local: int        # bytes of local memory per thread: register spills


class _CompileOnlyDriver(DriverBase):
    """An 'active' CUDA driver that only names the target: enough for Triton to compile."""

    @classmethod
    def is_active(cls) -> bool:
        return False

    def __init__(self) -> None:
        pass

    def get_current_target(self) -> GPUTarget:
        return H100

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Any:
        raise RuntimeError("compile-only driver: nothing runs")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("compile-only driver: nothing launches")


@contextlib.contextmanager
def compile_only() -> Iterator[list[Any]]:
    """Within the block every `kernel[grid](...)` compiles for sm_90 instead of launching;
    yields the list the compiled kernels are appended to."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("sm90_compile needs Triton outside interpreter mode: run it with "
                           "TRITON_INTERPRET=0")
    compiled: list[Any] = []
    original = KernelInterface.__getitem__

    def getitem(self: Any, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            compiled.append(kernel)
            return kernel
        return launch

    # Left in place afterwards: without a GPU there is no real driver to go back to.
    driver.set_active(_CompileOnlyDriver())
    KernelInterface.__getitem__ = getitem  # type: ignore[method-assign]
    try:
        yield compiled
    finally:
        KernelInterface.__getitem__ = original  # type: ignore[method-assign]


def resource_usage(kernel: Any) -> tuple[int, int]:
    """(registers per thread, local bytes per thread) of a compiled kernel's cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+).*LOCAL:(\d+)", text)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{text}")
    return int(found.group(1)), int(found.group(2))


def describe(kernel: Any) -> Launch:
    """What a compiled kernel uses, from its metadata and cubin."""
    registers, local = resource_usage(kernel)
    names = kernel.src.fn.arg_names
    constexprs = {names[path[0]]: value for path, value in kernel.src.constants.items()
                  if len(path) == 1 and isinstance(value, (int, float, str, bool))}
    return Launch(kernel=kernel.metadata.name, constexprs=constexprs,
                  num_warps=kernel.metadata.num_warps, shared=kernel.metadata.shared,
                  registers=registers, local=local)


def exercise_ops(ops: Ops, arch: ArchConfig, dtype: torch.dtype) -> None:
    """Call every op the way a model of `arch` calls it: prefill chunks, a mixed step, decode
    steps with few and many sequences (one split and several), a CUDA-graph decode (fixed
    splits), each of those under a sliding window with sinks, decodes sharing a prefix, token
    trees among decodes, and multi-LoRA on fused qkv, o, gate_up and down."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, head_dim = arch.num_attention_heads, arch.num_key_value_heads, arch.head_dim
    hidden, inter = arch.hidden_size, arch.intermediate_size
    num_tokens = 40
    x = torch.randn(num_tokens, hidden, generator=gen).to(dtype)
    weight = torch.ones(hidden, dtype=dtype)
    ops.rms_norm(x, weight, arch.rms_norm_eps)
    ops.fused_add_rms_norm(x, x.clone(), weight, arch.rms_norm_eps)
    ops.silu_and_mul(torch.randn(num_tokens, 2 * inter, generator=gen).to(dtype))
    qkv = torch.randn(num_tokens, arch.q_size + 2 * arch.kv_size, generator=gen).to(dtype)
    q, k, v = qkv.split([arch.q_size, arch.kv_size, arch.kv_size], dim=-1)
    q = q.view(num_tokens, heads, head_dim)              # strided views, as in the model
    k = k.view(num_tokens, kv_heads, head_dim)
    v = v.view(num_tokens, kv_heads, head_dim)
    if arch.qk_norm:
        ops.rms_norm(q, torch.ones(head_dim, dtype=dtype), arch.rms_norm_eps)
    cos_sin = RotaryEmbedding(head_dim, 4096, arch.rope_theta).cos_sin_cache
    ops.rotary(torch.arange(num_tokens), q, k, cos_sin)
    num_blocks = 4096 // BLOCK_SIZE * 4
    kv_cache = torch.zeros(2, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype=dtype)
    ops.write_kv_cache(k, v, kv_cache, torch.arange(num_tokens))
    ops.rotary_to_cache(torch.arange(num_tokens), q, k, v, cos_sin, kv_cache,
                        torch.arange(num_tokens))
    for cached, query_lens in _attention_steps():
        tables = [list(range(i * 256, i * 256 + -(-(c + n) // BLOCK_SIZE)))
                  for i, (c, n) in enumerate(zip(cached, query_lens))]
        tables = [[b % num_blocks for b in t] for t in tables]
        meta, _ = make_metadata(tables, cached, query_lens, BLOCK_SIZE, torch.device("cpu"))
        query = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype)
        ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
        if max(query_lens) == 1:                         # as captured in a CUDA graph
            meta.decode_num_splits = 16
            ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
        meta.window, meta.decode_num_splits = AttentionWindow(1024, 4), None  # KV compression
        ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
    # 64 decodes sharing a 2,000-token prefix, attending to it together (an eager step)
    tables = [list(range(125)) + [125 + i] for i in range(64)]
    meta, _ = make_metadata(tables, [2000 + i % 16 for i in range(64)], [1] * 64, BLOCK_SIZE,
                            torch.device("cpu"))
    meta.shared_prefix_groups = shared_prefix_groups(
        meta.block_tables.numpy(), meta.seq_lens_cpu, range(64), BLOCK_SIZE)
    query = torch.randn(64, heads, head_dim, generator=gen).to(dtype)
    ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
    # speculative decoding with token trees: two trees of 16 drafts among decodes
    tables = [list(range(i * 256, i * 256 + 70)) for i in range(3)]
    meta, _ = make_metadata(tables, [1000, 700, 40], [17, 1, 17], BLOCK_SIZE,
                            torch.device("cpu"))
    tree = tuple(i // 3 for i in range(16))
    set_tree_masks(meta, [(0, tree), (2, tree)])
    query = torch.randn(35, heads, head_dim, generator=gen).to(dtype)
    ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
    # ... and split into one decode a node (eager, then as captured in a CUDA graph)
    meta, _ = make_metadata([tables[0]] * 17, [1000 + j for j in range(17)], [1] * 17,
                            BLOCK_SIZE, torch.device("cpu"))
    meta.decode_tree_lo = torch.full((17,), 1000, dtype=torch.int32)
    meta.decode_tree_bits = torch.tensor(tree_bits(tree), dtype=torch.int64)
    query = torch.randn(17, heads, head_dim, generator=gen).to(dtype)
    ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
    meta.decode_num_splits = 16
    ops.paged_attention(query, kv_cache, meta, head_dim ** -0.5)
    _exercise_lora(ops, arch, dtype, gen)


def _attention_steps() -> list[tuple[list[int], list[int]]]:
    """(cached tokens, new tokens) per sequence of the attention steps exercised."""
    return [([0, 0], [300, 37]),                         # prefill chunks
            ([0, 500, 1000, 17], [64, 1, 1, 1]),         # a chunk among decodes
            ([3000, 4000], [1, 1]),                      # few long decodes: several splits
            ([200] * 256, [1] * 256)]                    # many short decodes: one split


def _exercise_lora(ops: Ops, arch: ArchConfig, dtype: torch.dtype,
                   gen: torch.Generator) -> None:
    """Shrink and expand for each projection LoRA wraps, in a prefill and a decode step."""
    q, kv = arch.q_size, arch.kv_size
    hidden, inter = arch.hidden_size, arch.intermediate_size
    projections = [  # (in, out slices)
        (hidden, ((0, q), (q, kv), (q + kv, kv))),       # fused qkv
        (q, ((0, hidden),)),                             # o
        (hidden, ((0, inter), (inter, inter))),          # fused gate/up
        (inter, ((0, hidden),)),                         # down
    ]
    prefill = build_lora_metadata([0] * 20 + [-1] * 5 + [3] * 70, torch.device("cpu"))
    decode_slots = [i % 5 - 1 for i in range(64)]
    decode = LoRAMetadata(
        token_slots=torch.tensor(decode_slots, dtype=torch.int32),
        seg_starts=torch.arange(65, dtype=torch.int32),
        seg_slots=torch.tensor(decode_slots, dtype=torch.int32),
        seg_starts_cpu=list(range(65)), seg_slots_cpu=decode_slots, max_seg_len=1)
    for in_features, slices in projections:
        out_features = slices[-1][0] + slices[-1][1]
        rank = LORA_RANK * len(slices)
        lora_a = torch.randn(4, rank, in_features, generator=gen).to(dtype)
        lora_b = torch.randn(4, out_features, LORA_RANK, generator=gen).to(dtype)
        for meta in (prefill, decode):
            x = torch.randn(meta.num_tokens, in_features, generator=gen).to(dtype)
            t = ops.lora_shrink(x, lora_a, meta)
            y = torch.zeros(meta.num_tokens, out_features, dtype=dtype)
            ops.lora_expand(t, lora_b, meta, y, slices if len(slices) > 1 else None)


def compile_all(shapes: list[str], dtypes: list[str]) -> list[dict[str, Any]]:
    """Compile every kernel specialisation the ops launch for these shapes and dtypes."""
    ops = triton_ops()
    results: list[dict[str, Any]] = []
    for name in shapes:
        arch = ArchConfig.from_hf_dict(shape_config(name))
        for dtype_name in dtypes:
            with compile_only() as compiled:
                exercise_ops(ops, arch, DTYPES[dtype_name])
            seen: set[str] = set()
            for kernel in compiled:
                if kernel.hash in seen:
                    continue
                seen.add(kernel.hash)
                results.append({"shape": name, "dtype": dtype_name,
                                **describe(kernel).__dict__})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"],
                        choices=list(DTYPES))
    args = parser.parse_args(argv)
    for result in compile_all(args.shapes, args.dtypes):
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
