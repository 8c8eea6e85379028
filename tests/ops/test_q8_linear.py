"""The Q8_0 lm head kept 8-bit (`taskloom.ops.q8_linear`, `csrc/q8_linear.c`): GGUF's Q8_0
blocks taken apart bit for bit as gguf dequantizes them, the C kernel's weights exactly the
bf16 values a dequantized model holds and its outputs within a bf16 rounding of the bf16
GEMM's at every row count and edge of its tiles, its torch path where it does not build, and
bad weights refused by name."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from taskloom.models.gguf_int4 import split_q8_0_blocks
from taskloom.ops import q8_linear
from taskloom.ops.q8_linear import Q8Linear, Q8Weight, native_q8_linear, q8_linear_ref

needs_kernel = pytest.mark.skipif(native_q8_linear() is None,
                                  reason="the C kernel does not build here")


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
    got = Q8Linear(weight)(x)                                # [96, 70]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.t(), torch.from_numpy(values).bfloat16())


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 13, 33])
@pytest.mark.parametrize("out_features, in_features", [(70, 96), (131, 32), (256, 576)])
def test_the_kernel_computes_the_bf16_gemm_within_a_rounding(
        rows: int, out_features: int, in_features: int) -> None:
    weight, _ = _q8(out_features, in_features, seed=rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    got = Q8Linear(weight)(x)
    w = weight.dequantize().bfloat16()
    exact = x.double() @ w.double().t()                      # [rows, out]
    ref = q8_linear_ref(x, weight)
    assert torch.equal(ref, F.linear(x, w))
    # products of bf16 values summed in float32, rounded once: within a bf16 rounding of the
    # exact sum, as torch's own bf16 GEMM
    bound = exact.abs() * 2.0 ** -8 + 1e-5 * in_features * exact.abs().max()
    assert ((got.double() - exact).abs() <= bound).all()
    assert ((ref.double() - exact).abs() <= bound).all()


@needs_kernel
def test_a_strided_input_and_no_rows() -> None:
    weight, _ = _q8(64, 64)
    head = Q8Linear(weight)
    x = torch.randn(5, 128).bfloat16()[:, ::2]               # not contiguous
    assert torch.equal(head(x), head(x.contiguous()))
    assert head(torch.empty(0, 64, dtype=torch.bfloat16)).shape == (0, 64)


def test_the_torch_path_runs_where_the_kernel_does_not(monkeypatch) -> None:
    weight, _ = _q8(40, 64)
    monkeypatch.setattr(q8_linear, "native_q8_linear", lambda: None)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(Q8Linear(weight)(x), q8_linear_ref(x, weight))
    # and any input the kernel does not take (float32) goes that way too
    monkeypatch.undo()
    xf = torch.randn(3, 64)
    assert torch.equal(Q8Linear(weight)(xf), F.linear(xf, weight.dequantize()))


def test_bad_weights_and_inputs_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="int8 codes"):
        Q8Weight(torch.zeros(4, 40, dtype=torch.int8), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="int8 codes"):
        Q8Weight(torch.zeros(4, 32, dtype=torch.uint8), torch.zeros(4, 1))
    head = Q8Linear(Q8Weight(torch.zeros(4, 32, dtype=torch.int8), torch.zeros(4, 1)))
    with pytest.raises(ValueError, match=r"expected x \[n, 32\], got \(2, 64\)"):
        head(torch.zeros(2, 64, dtype=torch.bfloat16))
