"""The small-batch lm head (`taskloom.ops.small_linear`, `csrc/small_linear.c`): GGUF's Q8_0
blocks taken apart bit for bit as gguf dequantizes them; the C kernel's Q8_0 weights exactly
the bf16 values a dequantized model holds, and its outputs over bf16 and Q8_0 weights within
a bf16 rounding of the bf16 GEMM's at every row count around its tiles; its torch path
where it does not build; and bad weights refused by name."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from taskloom.models.gguf_int4 import split_q8_0_blocks
from taskloom.ops import small_linear
from taskloom.ops.small_linear import Q8Weight, SmallBatchHead, library, q8_linear_ref

needs_kernel = pytest.mark.skipif(library() is None, reason="the C kernel does not build here")


def _q8(rows: int, cols: int, seed: int = 0) -> tuple[Q8Weight, np.ndarray]:
    """A random Q8_0 weight, as taken apart from GGUF blocks, and gguf's float32 values."""
    gen = np.random.default_rng(seed)
    w = gen.standard_normal((rows, cols)).astype(np.float32) * gen.uniform(
        0.01, 2.0, (rows, 1)).astype(np.float32)
    raw = gguf.quants.quantize(w, Q.Q8_0)
    return split_q8_0_blocks(raw, (rows, cols)), gguf.quants.dequantize(raw, Q.Q8_0)


def test_q8_0_blocks_split_into_codes_and_scales_that_gguf_dequantizes_to() -> None:
    weight, values = _q8(48, 96)
    assert weight.codes.dtype == torch.int8 and weight.scales.dtype == torch.float32
    assert weight.scales.shape == (48, 3)
    assert torch.equal(weight.dequantize(), torch.from_numpy(values))
    with pytest.raises(ValueError, match=r"Q8_0 blocks of 4896 bytes do not hold a \[48, 64\]"):
        split_q8_0_blocks(gguf.quants.quantize(values, Q.Q8_0), (48, 64))


@needs_kernel
def test_the_kernel_multiplies_by_the_bf16_values_a_dequantized_model_holds() -> None:
    weight, values = _q8(70, 96)
    # one-hot rows: each output is one weight times 1, so exactly the weight's bf16 value
    x = torch.eye(96, dtype=torch.bfloat16)
    got = SmallBatchHead(weight, max_rows=96)(x)             # [96, 70]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.t(), torch.from_numpy(values).bfloat16())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 13, 33])
@pytest.mark.parametrize("out_features, in_features", [(70, 96), (131, 32), (256, 576)])
def test_the_kernel_computes_the_bf16_gemm_within_a_rounding(
        rows: int, out_features: int, in_features: int) -> None:
    weight, _ = _q8(out_features, in_features, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    w = weight.dequantize().bfloat16()
    # a strided bf16 weight: a view of wider rows, as the kernel reads the model's in place
    wide = torch.cat([w, torch.full_like(w[:, :32], float("nan"))], dim=1)[:, :in_features]
    q8, bf16 = SmallBatchHead(weight)(x), SmallBatchHead(wide)(x)
    exact = x.double() @ w.double().t()                      # [rows, out]
    ref = q8_linear_ref(x, weight)
    assert torch.equal(ref, F.linear(x, w))
    # products of bf16 values summed in float32, rounded once: within a bf16 rounding of the
    # exact sum, as torch's own bf16 GEMM
    bound = exact.abs() * 2.0 ** -8 + 1e-5 * in_features * exact.abs().max()
    for got in (q8, bf16, ref):
        assert ((got.double() - exact).abs() <= bound).all()
    # the same weights, the same sums in the same order
    assert torch.equal(q8, bf16)


@needs_kernel
def test_a_strided_input_and_no_rows() -> None:
    weight, _ = _q8(64, 64)
    for head in (SmallBatchHead(weight), SmallBatchHead(weight.dequantize().bfloat16())):
        x = torch.randn(5, 128).bfloat16()[:, ::2]           # not contiguous
        assert torch.equal(head(x), head(x.contiguous()))
        assert head(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 64)


def test_the_torch_path_runs_where_the_kernel_does_not(monkeypatch) -> None:
    weight, _ = _q8(40, 64)
    w = weight.dequantize().bfloat16()
    monkeypatch.setattr(small_linear, "library", lambda: None)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(SmallBatchHead(weight)(x), q8_linear_ref(x, weight))
    assert torch.equal(SmallBatchHead(w)(x), F.linear(x, w))
    # and any input the kernel does not take (float32) goes that way too
    monkeypatch.undo()
    xf = torch.randn(3, 64)
    assert torch.equal(SmallBatchHead(weight)(xf), F.linear(xf, weight.dequantize()))
    assert torch.equal(SmallBatchHead(w)(xf), F.linear(xf, w.float()))


def test_bad_weights_and_inputs_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="int8 codes"):
        Q8Weight(torch.zeros(4, 40, dtype=torch.int8), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="int8 codes"):
        Q8Weight(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="bf16 .* got torch.float32"):
        SmallBatchHead(torch.zeros(4, 32))
    with pytest.raises(ValueError, match=r"got torch.bfloat16 \(4, 40\)"):
        SmallBatchHead(torch.zeros(4, 40, dtype=torch.bfloat16))
    head = SmallBatchHead(Q8Weight(torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 1)))
    with pytest.raises(ValueError, match=r"expected x \[n, 32\], got \(2, 64\)"):
        head(torch.zeros(2, 64, dtype=torch.bfloat16))
