"""Every Triton kernel compiles for an H100 (sm_90), as the ops launch it for real model shapes.

The interpreter tests (test_triton_kernels.py, test_triton_lora.py) check what the kernels
compute, but the interpreter runs programs the compiler refuses, and CI has no GPU. This test
compiles each launch ahead of time with Triton's bundled ptxas (tests/ops/sm90_compile.py, in a
subprocess because this session's Triton runs in interpreter mode) for the Llama-3.1-8B shape
in bfloat16 and the embedded SmolLM2 shape (head_dim 64, GQA groups of 3) in float32 (the
dtype whose tiles take the most shared memory), and checks that each fits an H100 block:
shared memory within 227 KiB and no register spills. Every step is also compiled under a
sliding window with sinks. `python -m tests.ops.sm90_compile` covers every named shape and
dtype (float16 compiles as bfloat16 does; both were checked when the kernels changed).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (the dev extra installs it on "
                                     "Linux x86_64)")

from tests.ops.sm90_compile import H100_MAX_SHARED  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CASES = [("llama-3.1-8b", "bfloat16"), ("smollm2-135m", "float32")]
KERNELS = {"_rms_norm_kernel", "_silu_and_mul_kernel", "_rotary_kernel", "_write_kv_kernel",
           "_rotary_to_cache_kernel",
           "_extend_kernel", "_decode_split_kernel", "_decode_reduce_kernel",
           "_prefix_split_kernel", "_segment_matmul_kernel"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.is_available(),
                       reason="with a CUDA device the kernel tests compile and run the kernels"),
]


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    """The compiled specialisations, one dict per kernel (see sm90_compile.Launch)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    # one compiler process a case, all at once: ptxas runs on one core
    runs = [(shape, dtype, subprocess.Popen(
        [sys.executable, "-m", "tests.ops.sm90_compile", "--shapes", shape, "--dtypes", dtype],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for shape, dtype in CASES]
    rows = []
    try:
        for shape, dtype, run in runs:
            out, err = run.communicate(timeout=600)
            assert run.returncode == 0, f"{shape} {dtype} did not compile:\n{err[-4000:]}"
            rows += [json.loads(line) for line in out.splitlines()]
    finally:
        for *_, run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    return rows


@pytest.mark.parametrize("shape,dtype", CASES)
def test_every_kernel_compiles_for_sm90(compiled: list[dict], shape: str, dtype: str) -> None:
    launched = {row["kernel"] for row in compiled
                if row["shape"] == shape and row["dtype"] == dtype}
    assert launched == KERNELS


def test_attention_compiles_under_a_sliding_window_with_sinks(compiled: list[dict]) -> None:
    for shape, dtype in CASES:
        windowed = {row["kernel"] for row in compiled if row["shape"] == shape
                    and row["dtype"] == dtype and row["constexprs"].get("SINKS")}
        assert windowed == {"_extend_kernel", "_decode_split_kernel"}, (shape, dtype)


def test_decode_compiles_with_one_split_and_with_several(compiled: list[dict]) -> None:
    for shape, dtype in CASES:
        splits = {row["constexprs"]["NUM_SPLITS"] for row in compiled
                  if row["kernel"] == "_decode_split_kernel" and row["shape"] == shape
                  and row["dtype"] == dtype}
        assert 1 in splits and max(splits) > 1, (shape, dtype, splits)


def test_kernels_fit_an_h100_block_without_spilling(compiled: list[dict]) -> None:
    too_big = [row for row in compiled if row["shared"] > H100_MAX_SHARED]
    spilled = [row for row in compiled if row["local"] > 0]
    assert not too_big, f"shared memory over {H100_MAX_SHARED} bytes: {too_big}"
    assert not spilled, f"register spills: {spilled}"
