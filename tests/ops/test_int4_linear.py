"""4-bit linears: GGUF's Q4_0/Q4_1/Q4_K blocks taken apart against the gguf package's own
dequantization, torch's int4 packing unpacked, and TorchInt4Linear (both of its GEMM routes,
fused shards, LoRA on top) against F.linear over the dequantized weight. The int8-dot kernel's
VnniInt4Linear: tests/ops/test_int4_vnni.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from torch import nn

from taskloom.lora.layers import LoRALinear, LoRAState
from taskloom.lora.metadata import build_lora_metadata
from taskloom.models.gguf_int4 import split_int4_blocks
from taskloom.models.weights import materialize
from taskloom.ops import cpu_native
from taskloom.ops.backend import TORCH_OPS
from taskloom.ops.int4_linear import (INT4_KERNEL_MAX_ROWS, INT4_KERNEL_MAX_ROWS_NATIVE,
                                      Int4Linear, Int4Scratch, Int4Weight, TorchInt4Linear,
                                      int4_layout, int4_linear_type, int4_supported,
                                      native_unpack, swap_int4_linears, unpack_codes)

needs_int4 = pytest.mark.skipif(not int4_supported(torch.bfloat16),
                                reason="this torch's CPU int4 packing has no layout we read")


def _q4_k_blocks(rows: int, cols: int, seed: int) -> np.ndarray:
    """Random Q4_K blocks (gguf cannot quantize to Q4_K): random codes and 6-bit scales,
    small positive fp16 super-scales."""
    rng = np.random.default_rng(seed)
    _, type_size = GGML_QUANT_SIZES[Q.Q4_K]
    blocks = rng.integers(0, 256, (rows, cols // 256, type_size), dtype=np.uint8)
    d = rng.uniform(1e-3, 1e-2, (rows, cols // 256, 2)).astype(np.float16)
    blocks[..., 0:4] = d.view(np.uint8).reshape(rows, cols // 256, 4)   # d, dmin
    return blocks.reshape(rows, -1)


def _blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    if qtype == Q.Q4_K:
        return _q4_k_blocks(rows, cols, seed)
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    return quantize(w / cols ** 0.5, qtype)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_split_blocks_dequantize_as_gguf_does_bit_for_bit(qtype: Q) -> None:
    raw = _blocks(qtype, 48, 512)
    w = split_int4_blocks(raw, qtype, (48, 512))
    assert w.codes.dtype == torch.uint8 and int(w.codes.max()) <= 15
    assert w.scales.shape == w.mins.shape == (48, 16)
    assert torch.equal(w.dequantize(), torch.from_numpy(dequantize(raw, qtype)))


def test_split_blocks_refuses_other_types_and_sizes() -> None:
    with pytest.raises(ValueError, match="Q8_0 is not a 4-bit affine GGUF type"):
        split_int4_blocks(np.zeros((4, 34), np.uint8), Q.Q8_0, (4, 32))
    with pytest.raises(ValueError, match=r"Q4_1 blocks of 80 bytes do not hold a \[4, 64\]"):
        split_int4_blocks(np.zeros((4, 20), np.uint8), Q.Q4_1, (4, 64))


@needs_int4
@pytest.mark.parametrize("rows", [16, 48, 64, 80, 208, 256])
def test_unpack_gives_back_what_torch_packed(rows: int) -> None:
    codes = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows),
                          dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(unpack_codes(packed, 96, int4_layout()).int(), codes)


def _int4_linear(out_f: int, in_f: int, bias: bool, fused: dict | None = None,
                 kind: type[Int4Linear] = TorchInt4Linear) -> nn.Module:
    with torch.device("meta"):
        linear = nn.Linear(in_f, out_f, bias=bias)
        if fused is not None:
            linear.weight.shard_rows = fused
            linear.weight.shard_ids = tuple(fused)
        layer = kind(linear)
    materialize(layer, torch.bfloat16, torch.device("cpu"))
    if bias:
        with torch.no_grad():
            layer.bias.copy_(0.1 * torch.randn(out_f, generator=torch.Generator().manual_seed(9)))
    return layer


def _weight(rows: int, cols: int, qtype: Q = Q.Q4_1, seed: int = 0) -> Int4Weight:
    return split_int4_blocks(_blocks(qtype, rows, cols, seed), qtype, (rows, cols))


@needs_int4
@pytest.mark.parametrize("rows", [0, 1, 3, INT4_KERNEL_MAX_ROWS_NATIVE + 1,
                                  INT4_KERNEL_MAX_ROWS + 1, 300])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
@pytest.mark.parametrize("out_f", [208, 256])          # 3 blocks of 64 rows and 16; 4 blocks
def test_int4_linear_computes_f_linear_of_the_dequantized_weight(rows: int, qtype: Q,
                                                                 out_f: int) -> None:
    for bias in (True, False):
        layer = _int4_linear(out_f, 256, bias)
        w = _weight(out_f, 256, qtype)
        layer.weight.weight_loader(layer.weight, w, None)
        x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).bfloat16()
        ref = F.linear(x.float(), w.dequantize(), None if layer.bias is None
                       else layer.bias.float())
        size = ref.abs().max().item() if rows else 1.0
        for out in (layer(x), layer.forward_kernel(x), layer.forward_unpacked(x)):
            assert out.shape == (rows, out_f) and out.dtype == torch.bfloat16
            # bf16 scales and bf16 output: a few roundings of the output's magnitude
            torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.02 * size)
    # the unpacked weight is the dequantized one, rounded to bf16 (scales and products)
    torch.testing.assert_close(layer.dequantize().float(), w.dequantize(), rtol=0,
                               atol=0.01 * w.dequantize().abs().max().item())


@needs_int4
def test_int4_linear_takes_a_strided_input() -> None:
    layer = _int4_linear(64, 96, bias=False)
    w = _weight(64, 96)
    layer.weight.weight_loader(layer.weight, w, None)
    x = torch.randn(96, 10).bfloat16().t()                   # [10, 96], not contiguous
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def fused_in_any_order(kind: type[Int4Linear]) -> tuple[nn.Module, Int4Weight]:
    """A fused q/k/v 4-bit linear of `kind` loaded shard by shard, out of order (checked to
    pack only once the last has come), and the whole weight it holds."""
    shards = {"q": (0, 64), "k": (64, 32), "v": (96, 32)}
    layer = _int4_linear(128, 64, bias=False, fused=shards, kind=kind)
    parts = {s: _weight(n, 64, seed=i) for i, (s, (_, n)) in enumerate(shards.items())}
    before = layer.weight.clone()
    for s in ("v", "q"):
        layer.weight.weight_loader(layer.weight, parts[s], s)
    assert torch.equal(layer.weight, before), "packed before the last shard came"
    layer.weight.weight_loader(layer.weight, parts["k"], "k")
    return layer, Int4Weight(*(torch.cat([getattr(parts[s], f) for s in ("q", "k", "v")])
                               for f in ("codes", "scales", "mins")))


@needs_int4
def test_fused_shards_pack_once_all_have_come_in_any_order() -> None:
    layer, w = fused_in_any_order(TorchInt4Linear)
    whole = w.dequantize()
    x = torch.randn(5, 64).bfloat16()
    ref = F.linear(x.float(), whole)
    torch.testing.assert_close(layer(x).float(), ref, rtol=0, atol=0.02 * ref.abs().max().item())


@needs_int4
def test_int4_loader_names_what_is_wrong() -> None:
    layer = _int4_linear(128, 64, bias=False, fused={"q": (0, 64), "k": (64, 64)})
    load = layer.weight.weight_loader
    with pytest.raises(ValueError, match="takes 4-bit GGUF blocks, got Tensor"):
        load(layer.weight, torch.zeros(64, 64), "q")
    with pytest.raises(ValueError, match=r"takes shards \['q', 'k'\], got 'v'"):
        load(layer.weight, _weight(64, 64), "v")
    with pytest.raises(ValueError, match=r"expected shape \(64, 64\), got \(32, 64\)"):
        load(layer.weight, _weight(32, 64), "k")
    with pytest.raises(ValueError, match=r"in_features % 32 == 0 and out_features % 16 == 0"):
        TorchInt4Linear(nn.Linear(40, 64, device="meta"))


def test_swap_replaces_only_linears() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    assert swap_int4_linears(model, {"0"}) == 1 and type(model[0]) is int4_linear_type()
    with pytest.raises(ValueError, match="1 is a LayerNorm, not a linear layer"):
        swap_int4_linears(model, {"1"})


@needs_int4
def test_lora_over_an_int4_projection_adds_the_same_term() -> None:
    layer = _int4_linear(48, 32, bias=True)
    w = _weight(48, 32)
    layer.weight.weight_loader(layer.weight, w, None)
    dense = nn.Linear(32, 48).bfloat16()
    with torch.no_grad():
        dense.weight.copy_(w.dequantize())
        dense.bias.copy_(layer.bias)
    gen = torch.Generator().manual_seed(5)
    a_w = (0.3 * torch.randn(2, 4, 32, generator=gen)).bfloat16()
    b_w = (0.3 * torch.randn(2, 48, 4, generator=gen)).bfloat16()
    meta = build_lora_metadata([-1, 0, 1, 1, -1, 0], torch.device("cpu"))
    x = torch.randn(6, 32).bfloat16()
    terms = []
    for base in (dense, layer):
        lora = LoRALinear(base, 0, (("o_proj", 48),), max_loras=2, max_rank=4,
                          ops=TORCH_OPS, state=LoRAState(meta))
        assert lora.lora_a.dtype == torch.bfloat16
        lora.lora_a.copy_(a_w)
        lora.lora_b.copy_(b_w)
        terms.append((lora(x) - base(x)).float())
    assert terms[0].abs().max() > 0.1                        # the adapter term is there
    torch.testing.assert_close(terms[1], terms[0], rtol=0, atol=0.05)


@needs_int4
@pytest.mark.skipif(native_unpack() is None, reason="no C compiler here to build the unpack")
@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_K])
def test_the_c_unpack_and_the_torch_unpack_give_the_same_bits(qtype: Q) -> None:
    layer = _int4_linear(320, 512, bias=False)
    layer.weight.weight_loader(layer.weight, _weight(320, 512, qtype, seed=3), None)
    assert layer.kernel_max_rows == INT4_KERNEL_MAX_ROWS_NATIVE
    wt = layer.dequantize_t()
    assert wt.shape == (512, 320) and wt.is_contiguous()
    assert torch.equal(wt, layer._dequantize_torch().t())


def test_a_kernel_that_cannot_be_built_is_none_and_says_why(
        tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    cpu_native.load_kernel.cache_clear()
    try:
        assert cpu_native.load_kernel("int4_unpack") is None
        assert "cannot build the C kernel int4_unpack" in caplog.text
        monkeypatch.delenv("CC")
        cpu_native.load_kernel.cache_clear()
        if cpu_native.shutil.which("cc") or cpu_native.shutil.which("gcc"):
            assert cpu_native.load_kernel("int4_unpack") is not None   # built afresh
            assert list((tmp_path / "taskloom" / "kernels").glob("int4_unpack-*.so"))
    finally:
        cpu_native.load_kernel.cache_clear()


@needs_int4
def test_projections_sharing_a_scratch_buffer_each_compute_their_own() -> None:
    scratch = Int4Scratch()
    layers, weights = [], []
    for i, (out_f, in_f) in enumerate([(128, 64), (64, 128), (192, 64)]):
        with torch.device("meta"):
            layer = TorchInt4Linear(nn.Linear(in_f, out_f, bias=False), scratch)
        materialize(layer, torch.bfloat16, torch.device("cpu"))
        weights.append(_weight(out_f, in_f, seed=i))
        layer.weight.weight_loader(layer.weight, weights[-1], None)
        layers.append(layer)
    x = {k: torch.randn(80, k).bfloat16() for k in (64, 128)}
    outs = [m.forward_unpacked(x[m.in_features]) for m in layers + layers[::-1]]
    for m, w, out in zip(layers + layers[::-1], weights + weights[::-1], outs):
        ref = F.linear(x[m.in_features].float(), w.dequantize())
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.02 * ref.abs().max().item())


@needs_int4
def test_without_the_c_unpack_the_torch_ops_unpack_at_64_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from taskloom.ops import int4_linear
    monkeypatch.setattr(int4_linear, "native_unpack", lambda: None)
    layer = _int4_linear(256, 128, bias=True)
    w = _weight(256, 128)
    layer.weight.weight_loader(layer.weight, w, None)
    assert layer.kernel_max_rows == INT4_KERNEL_MAX_ROWS
    x = torch.randn(100, 128).bfloat16()
    ref = F.linear(x.float(), w.dequantize(), layer.bias.float())
    out = layer(x)                                           # the unpacked route, by torch
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=0.02 * ref.abs().max().item())


def test_the_base_names_what_a_4bit_linear_must_say() -> None:
    with pytest.raises(TypeError, match="abstract.*(_pack|compute_dtype|dequantize)"):
        Int4Linear(nn.Linear(32, 16, device="meta"))
