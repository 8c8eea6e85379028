"""PackedLinear (oneDNN-packed weights, CPU bf16/fp16) against F.linear, the model with its
projections packed against the model without, and the engine that packs them (LoRA on top)
against an engine that does not."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskloom import LLM, SamplingParams
from taskloom.config import ModelConfig
from taskloom.lora.layers import LoRALinear, LoRAState
from taskloom.lora.metadata import build_lora_metadata
from taskloom.lora.random_adapter import write_random_adapter
from taskloom.models.loader import load_model, random_arch
from taskloom.ops.backend import TORCH_OPS
from taskloom.ops.linear import PackedLinear, pack_cpu_linears, packing_supported
from taskloom.runtime import builder
from tests.models.single_seq import forward_batch
from tests.models.tiny_models import build_tiny_hf, random_prompts

HALF = [pytest.param(dt, marks=pytest.mark.skipif(
    not packing_supported(dt), reason=f"oneDNN on this CPU has no native {dt} GEMM"))
    for dt in (torch.bfloat16, torch.float16)]


def _weights(out_f: int, in_f: int, dtype: torch.dtype, seed: int = 0,
             bias: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(out_f, in_f, generator=gen) / in_f ** 0.5).to(dtype)
    b = (0.1 * torch.randn(out_f, generator=gen)).to(dtype) if bias else None
    return w, b


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows", [0, 1, 3, 17, 64, 300, 1030])
def test_packed_linear_computes_what_f_linear_computes(dtype: torch.dtype, rows: int) -> None:
    for bias in (True, False):
        w, b = _weights(200, 96, dtype, bias=bias)
        layer = PackedLinear(w, b)
        x = torch.randn(rows, 96).to(dtype)
        out, ref = layer(x), F.linear(x, w, b)
        assert out.shape == (rows, 200) and out.dtype == dtype
        # the same kernels without the per-call reorder: equal, or off by a rounding
        torch.testing.assert_close(out, ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    assert layer.weight.is_mkldnn and layer.weight.shape == (200, 96)
    assert (layer.in_features, layer.out_features) == (96, 200)


@pytest.mark.parametrize("dtype", HALF)
def test_packed_linear_takes_a_strided_input(dtype: torch.dtype) -> None:
    w, b = _weights(64, 48, dtype)
    x = torch.randn(48, 10).to(dtype).t()                    # [10, 48], not contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(PackedLinear(w, b)(x), F.linear(x, w, b),
                               rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_only_2d_cpu_weights_are_packed() -> None:
    with pytest.raises(ValueError, match=r"packs a 2-D CPU weight, got \(4,\)"):
        PackedLinear(torch.zeros(4, dtype=torch.bfloat16), None)


def _tiny(tmp_path: Path, dtype: str) -> nn.Module:
    build_tiny_hf("qwen2-bias").config.save_pretrained(tmp_path)      # q/k/v biases
    return load_model(ModelConfig(model=str(tmp_path / "config.json"), random_weights=True,
                                  dtype=dtype, seed=1)).model


@pytest.mark.parametrize("dtype", HALF)
def test_a_model_with_packed_projections_computes_the_same_logits(
        tmp_path: Path, dtype: torch.dtype) -> None:
    name = str(dtype).removeprefix("torch.")
    plain, packed = _tiny(tmp_path / "a", name), _tiny(tmp_path / "b", name)
    layers = len(packed.model.layers)
    assert pack_cpu_linears(packed) == 4 * layers
    attn, mlp = packed.model.layers[0].self_attn, packed.model.layers[0].mlp
    assert all(isinstance(m, PackedLinear) for m in (attn.qkv_proj, attn.o_proj,
                                                     mlp.gate_up_proj, mlp.down_proj))
    assert attn.qkv_proj.bias is not None
    assert type(packed.lm_head) is nn.Linear                           # not packed
    prompts = random_prompts(256, seed=3)[:3]
    for a, b in zip(forward_batch(plain, prompts), forward_batch(packed, prompts)):
        torch.testing.assert_close(b, a, rtol=0, atol=0.02 * a.abs().max().item())


def test_float32_models_keep_f_linear(tmp_path: Path) -> None:
    model = _tiny(tmp_path, "float32")
    assert pack_cpu_linears(model) == 0
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear


@pytest.mark.parametrize("dtype", HALF)
def test_lora_over_a_packed_projection_adds_the_same_term(dtype: torch.dtype) -> None:
    w, b = _weights(48, 32, dtype)
    base = nn.Linear(32, 48).to(dtype)
    with torch.no_grad():
        base.weight.copy_(w)
        base.bias.copy_(b)
    gen = torch.Generator().manual_seed(5)
    a_w = (0.3 * torch.randn(2, 4, 32, generator=gen)).to(dtype)
    b_w = (0.3 * torch.randn(2, 48, 4, generator=gen)).to(dtype)
    meta = build_lora_metadata([-1, 0, 1, 1, -1, 0], torch.device("cpu"))
    x = torch.randn(6, 32).to(dtype)
    outs = []
    for impl in (base, PackedLinear(w, b)):
        lora = LoRALinear(impl, 0, (("o_proj", 48),), max_loras=2, max_rank=4,
                          ops=TORCH_OPS, state=LoRAState(meta))
        lora.lora_a.copy_(a_w)
        lora.lora_b.copy_(b_w)
        outs.append(lora(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=2 * torch.finfo(dtype).eps, atol=1e-3)
    assert not torch.equal(outs[0], base(x))       # the adapter term is there


@pytest.mark.skipif(not packing_supported(torch.bfloat16),
                    reason="oneDNN on this CPU has no native bf16 GEMM")
def test_a_bf16_engine_packs_and_answers_as_one_that_does_not(
        tiny_model: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.e2e.conftest import assert_pool_full
    arch, _ = random_arch(str(Path(tiny_model) / "config.json"))
    loras = {"a": write_random_adapter(str(tmp_path / "a"), arch, rank=4, seed=1, std=0.2)}
    prompts = ["Name three rivers.", "def quicksort(xs):", "The capital of France is",
               "Once upon a time"]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    def run(llm: LLM) -> list[list[int]]:
        outs = llm.generate(prompts, params, use_tqdm=False, lora=[None, "a", None, "a"])
        assert_pool_full(llm)
        return [o.outputs[0].token_ids for o in outs]

    packed = LLM(tiny_model, dtype="bfloat16", num_blocks=64, block_size=4, loras=loras)
    proj = packed.engine.runner.model.model.layers[1].mlp.gate_up_proj
    assert isinstance(proj, LoRALinear) and isinstance(proj.base, PackedLinear)
    got = run(packed)
    monkeypatch.setattr(builder, "pack_cpu_linears", lambda model: 0)
    plain = LLM(tiny_model, dtype="bfloat16", num_blocks=64, block_size=4, loras=loras)
    assert type(plain.engine.runner.model.model.layers[1].mlp.gate_up_proj.base) is nn.Linear
    assert got == run(plain)
