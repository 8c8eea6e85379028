"""The int8-dot 4-bit linear (`taskloom.ops.int4_vnni`, `csrc/q4_linear.c`): its tile layout
against the codes it was packed from, the C kernel against the same arithmetic in torch
(`int4_vnni_ref`, float64 sums), and against F.linear over the dequantized weight within
what rounding the activations to int8 costs; shards, bias, strides, LoRA, bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q
from torch import nn

from taskloom.lora.layers import LoRALinear, LoRAState
from taskloom.lora.metadata import build_lora_metadata
from taskloom.ops.backend import TORCH_OPS
from taskloom.ops.int4_linear import Int4Weight, TorchInt4Linear, int4_linear_type
from taskloom.ops.int4_vnni import (VnniInt4Linear, int4_vnni_ref, library, pack_tiles,
                                    quantize_activations, unpack_tiles, vnni_available)
from tests.ops.test_int4_linear import _int4_linear, _weight, fused_in_any_order

needs_vnni = pytest.mark.skipif(library() is None,
                                reason="the q4_linear kernel needs a C compiler and a CPU "
                                       "with AVX-512 VNNI")


def _layer(out_f: int, in_f: int, bias: bool = False, fused: dict | None = None,
           w: Int4Weight | None = None) -> VnniInt4Linear:
    layer = _int4_linear(out_f, in_f, bias, fused, kind=VnniInt4Linear)
    if w is not None:
        layer.weight.weight_loader(layer.weight, w, None)
    return layer


def _x(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).bfloat16()


@pytest.mark.parametrize("shape", [(16, 32), (48, 576), (32, 1536)])
def test_tiles_hold_the_codes_and_fp16_terms_they_were_packed_from(shape) -> None:
    w = _weight(*shape, qtype=Q.Q4_K, seed=3) if shape[1] % 256 == 0 else _weight(*shape)
    codes, scales, mins = pack_tiles(w)
    assert codes.shape == (shape[0], shape[1] // 2) and codes.dtype == torch.uint8
    assert scales.dtype == mins.dtype == torch.int16           # no float: `.to(dtype)` spares
    back = unpack_tiles(codes, scales, mins)
    assert torch.equal(back.codes, w.codes)
    assert torch.equal(back.scales, w.scales.half().float())
    assert torch.equal(back.mins, w.mins.half().float())


def test_packing_refuses_shapes_and_terms_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match=r"rows % 16 == 0 and cols % 32 == 0, got \[24, 64\]"):
        pack_tiles(_weight(24, 64))
    w = _weight(16, 64)
    w.scales[3, 1] = 1e6
    with pytest.raises(ValueError, match="scale is beyond fp16's range"):
        pack_tiles(w)


def test_activations_quantize_per_group_of_32() -> None:
    x = _x(3, 96)
    x[1, 32:64] = 0                                            # a group of zeros: scale 0
    codes, scale, sums = quantize_activations(x)
    assert codes.dtype == torch.int32 and int(codes.abs().max()) <= 127 * 256 + 128
    assert scale[1, 1] == 0 and not codes[1, 32:64].any()
    back = (codes.float().view(3, 3, 32) * scale[..., None]).view(3, 96)
    # a 16-bit code: within a step (1 / (127 * 256) of the group's largest value; half a
    # step but where the low part saturates)
    err = (back - x.float()).view(3, 3, 32).abs()
    assert (err <= scale[..., None] * 1.001).all()
    assert err.max() < 1e-4 * x.float().abs().max()
    torch.testing.assert_close(sums, x.float().view(3, 3, 32).sum(-1))


@needs_vnni
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 64, 65, 130])
@pytest.mark.parametrize("shape", [(16, 32), (48, 576), (64, 1536)])
def test_the_kernel_computes_its_reference(rows: int, shape) -> None:
    out_f, in_f = shape
    w = _weight(out_f, in_f, seed=rows)
    layer = _layer(out_f, in_f, w=w)
    x = _x(rows, in_f, seed=rows)
    y = layer(x)
    assert y.shape == (rows, out_f) and y.dtype == torch.bfloat16
    ref = int4_vnni_ref(x, w)
    # the same integer products; float32 sums in another order, one bf16 rounding
    size = ref.abs().max().item()
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-5 * size)


@needs_vnni
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_the_kernel_is_f_linear_of_the_dequantized_weight_within_int8_activations(
        qtype: Q) -> None:
    w = _weight(64, 512, qtype)
    layer = _layer(64, 512, bias=True, w=w)
    x = _x(7, 512)
    ref = F.linear(x.float(), w.dequantize(), layer.bias.float())
    err = (layer(x).float() - ref).abs().max().item()
    bf16 = F.linear(x, layer.dequantize(), layer.bias).float()
    bf16_err = (bf16 - ref).abs().max().item()
    # int8 activations: ~0.5% of the largest output, a few times the bf16 GEMM's rounding
    assert 0 < err < 0.015 * ref.abs().max().item()
    assert err < 6 * bf16_err
    torch.testing.assert_close(layer.dequantize().float(), w.dequantize(), rtol=0,
                               atol=0.01 * w.dequantize().abs().max().item())


@needs_vnni
def test_zero_rows_bias_strides_and_leading_dims() -> None:
    w = _weight(32, 96)
    layer = _layer(32, 96, bias=True, w=w)
    assert layer(torch.zeros(0, 96, dtype=torch.bfloat16)).shape == (0, 32)
    # an all-zero row: every group's scale is 0, the output the bias
    torch.testing.assert_close(layer(torch.zeros(1, 96, dtype=torch.bfloat16))[0], layer.bias,
                               rtol=0, atol=0)
    x = torch.randn(96, 10).bfloat16().t()                     # [10, 96], not contiguous
    wide = torch.randn(10, 200).bfloat16()[:, 50:146]          # rows 200 apart
    for strided in (x, wide):
        torch.testing.assert_close(layer(strided), layer(strided.contiguous()), rtol=0, atol=0)
    x3 = _x(6, 96).view(2, 3, 96)
    torch.testing.assert_close(layer(x3), layer(x3.reshape(6, 96)).view(2, 3, 32),
                               rtol=0, atol=0)


@needs_vnni
def test_fused_shards_pack_once_all_have_come() -> None:
    layer, whole = fused_in_any_order(VnniInt4Linear)
    x = _x(3, 64)
    torch.testing.assert_close(layer(x).double(), int4_vnni_ref(x, whole), rtol=2 ** -8,
                               atol=1e-5)


@needs_vnni
def test_bad_input_is_named() -> None:
    layer = _layer(16, 32, w=_weight(16, 32))
    with pytest.raises(ValueError, match=r"takes bf16 CPU activations \[\.\.\., 32\], got "
                                         r"torch.float32"):
        layer(torch.zeros(2, 32))
    with pytest.raises(ValueError, match=r"got torch.bfloat16 \(2, 64\)"):
        layer(torch.zeros(2, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="out_features % 16 == 0"):
        VnniInt4Linear(nn.Linear(32, 40, device="meta"))
    with pytest.raises(ValueError, match="a 4-bit projection takes 4-bit GGUF blocks"):
        layer.weight.weight_loader(layer.weight, torch.zeros(16, 32), None)


@needs_vnni
def test_lora_over_an_int8_dot_projection_adds_the_same_term() -> None:
    w = _weight(48, 32)
    layer = _layer(48, 32, bias=True, w=w)
    assert layer.compute_dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    a_w = (0.3 * torch.randn(2, 4, 32, generator=gen)).bfloat16()
    b_w = (0.3 * torch.randn(2, 48, 4, generator=gen)).bfloat16()
    meta = build_lora_metadata([-1, 0, 1, 1, -1, 0], torch.device("cpu"))
    x = _x(6, 32)
    lora = LoRALinear(layer, 0, (("o_proj", 48),), max_loras=2, max_rank=4, ops=TORCH_OPS,
                      state=LoRAState(meta))
    assert lora.lora_a.dtype == torch.bfloat16
    lora.lora_a.copy_(a_w)
    lora.lora_b.copy_(b_w)
    slots = torch.tensor([-1, 0, 1, 1, -1, 0])
    term = torch.zeros(6, 48)
    for i, slot in enumerate(slots.tolist()):
        if slot >= 0:
            term[i] = b_w[slot].float() @ (a_w[slot].float() @ x[i].float())
    assert term.abs().max() > 0.1
    torch.testing.assert_close((lora(x) - layer(x)).float(), term, rtol=0, atol=0.05)


def test_the_kind_follows_the_machine_and_the_kernel_switch(monkeypatch) -> None:
    expected = VnniInt4Linear if library() is not None else TorchInt4Linear
    assert vnni_available() == (library() is not None)
    assert int4_linear_type() is expected
    monkeypatch.setenv("TASKLOOM_CPU_KERNELS", "0")
    assert not vnni_available() and int4_linear_type() is TorchInt4Linear
