"""`quantization="gguf"`: a GGUF file's 4-bit projections loaded as they are stored, in every
architecture taskloom runs (llama.cpp's q/k permute undone, Qwen2's biases), computing what the
dequantized model computes to bf16's precision; a Q8_0 lm head kept 8-bit as well for the
logits of a few rows (without it, a bf16 model's own head in the same C loop); the embedded
model held at a quarter of its projections' bf16 memory and served by the engine, adapters
on top; and the settings it cannot run with refused by name."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from taskloom import LLM, SamplingParams
from taskloom.bench.latency import decode_bytes_per_step
from taskloom.config import ModelConfig
from taskloom.lora.layers import LoRALinear
from taskloom.lora.random_adapter import write_random_adapter
from taskloom.models.loader import load_model
from taskloom.ops.int4_linear import Int4Linear, int4_linear_type, int4_supported
from taskloom.ops.linear import PackedLinear, packing_supported
from taskloom.ops.small_linear import SMALL_BATCH_MAX_ROWS, SmallBatchHead, small_linear_worthwhile
from tests.models.gguf_files import write_gguf_from_hf
from tests.models.single_seq import forward_batch
from tests.models.tiny_models import TINY_CASES, build_tiny_hf, random_prompts

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not int4_supported(torch.bfloat16),
                                 reason="this torch's CPU int4 packing has no layout we read")]


def _projections(model) -> list:
    return [m for layer in model.model.layers
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                      layer.mlp.gate_up_proj, layer.mlp.down_proj)]


@pytest.mark.parametrize("kernels", ["1", "0"])      # int8 dot products here, or torch's int4
@pytest.mark.parametrize("case", list(TINY_CASES))
def test_4bit_projections_compute_what_the_dequantized_model_computes(
        tmp_path: Path, case: str, kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKLOOM_CPU_KERNELS", kernels)
    hf = build_tiny_hf(case)
    qtype = Q.Q4_0 if case.startswith("mistral") else Q.Q4_1
    path = str(tmp_path / "model.gguf")
    write_gguf_from_hf(path, hf.config, hf.state_dict(), qtype=qtype)
    int4 = load_model(ModelConfig(model=path, dtype="bfloat16", quantization="gguf")).model
    exact = load_model(ModelConfig(model=path)).model           # float32, dequantized
    rounded = load_model(ModelConfig(model=path, dtype="bfloat16")).model
    assert all(type(m) is int4_linear_type() for m in _projections(int4))
    assert not isinstance(rounded.model.layers[0].mlp.down_proj, Int4Linear)
    prompts = random_prompts(hf.config.vocab_size, seed=4)[:3]
    for ref, got, bf16 in zip(forward_batch(exact, prompts), forward_batch(int4, prompts),
                              forward_batch(rounded, prompts)):
        err, bf16_err = (got - ref).abs().max().item(), (bf16 - ref).abs().max().item()
        # a wrong row order or scale is an error of the logits' own size; 4-bit weights
        # round about as the dequantized bf16 weights do (torch's kernel: bf16 scales; the
        # int8 dot products: fp16 scales, activations in two int8 parts)
        assert err < 0.05 * ref.abs().max().item()
        assert err < 4 * bf16_err + 1e-3


def test_the_embedded_model_keeps_its_q4_1_projections_at_a_quarter_of_bf16() -> None:
    int4 = load_model(ModelConfig(dtype="bfloat16", quantization="gguf")).model
    plain = load_model(ModelConfig(dtype="bfloat16")).model
    assert all(isinstance(m, Int4Linear) for m in _projections(int4))
    # its tied embedding is Q8_0: kept 8-bit as well, for the logits of a decode step, and
    # what a decode step reads counts that head up to its rows, the bf16 one above; the bf16
    # model's small-batch head is its own bf16 head
    head, bf16_head = int4.small_batch_head, plain.small_batch_head
    params = sum(p.numel() * p.element_size() for p in int4.parameters())
    embed = int4.model.embed_tokens.weight
    if small_linear_worthwhile():
        assert head.holds_copy and not bf16_head.holds_copy
        assert bf16_head.bf16.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
        # a byte a weight and a float32 scale per 32: (1 + 4 / 32) / 2 of bf16's bytes
        q8 = head.nbytes
        assert q8 / (embed.numel() * embed.element_size()) == pytest.approx(0.5625, abs=1e-3)
        assert decode_bytes_per_step(int4, 0, 2, 0) == \
            params - embed.numel() * embed.element_size() + q8 + 2 * embed[0].numel() * 2
        plain_params = sum(p.numel() * p.element_size() for p in plain.parameters())
        assert decode_bytes_per_step(plain, 0, 2, 0) == plain_params
    else:
        assert head is None and bf16_head is None
    assert decode_bytes_per_step(int4, 0, SMALL_BATCH_MAX_ROWS + 1, 0) == params

    def nbytes(model) -> int:
        return sum(p.numel() * p.element_size() for p in model.model.layers.parameters())

    # 4 bits a weight and two bf16 terms a group of 32: 0.25 + 0.0625 of bf16's bytes
    assert 0.30 < nbytes(int4) / nbytes(plain) < 0.33


def test_an_engine_serves_4bit_projections_with_adapters(tmp_path: Path) -> None:
    from tests.e2e.conftest import assert_pool_full
    llm = LLM(dtype="bfloat16", quantization="gguf", num_blocks=128, enable_lora=True,
              max_num_batched_tokens=256)
    assert llm.engine.runs_on == "bfloat16 on cpu with 4-bit GGUF projections"
    llm.load_lora("a", write_random_adapter(str(tmp_path / "a"), llm.engine.runner.arch,
                                            rank=4, seed=1, std=0.3))
    proj = llm.engine.runner.model.model.layers[0].mlp.gate_up_proj
    assert isinstance(proj, LoRALinear) and isinstance(proj.base, Int4Linear)
    long = "Summarise this. " + "The river runs to the sea and the sea is wide. " * 20
    prompts = ["The capital of France is", long, "def fibonacci(n):", long]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False, lora=[None, None, "a", "a"])
    # long prefill chunks and decodes (torch's int4 kernel: unpacked above its rows)
    assert len(llm.tokenizer.encode(long)) > 200
    assert [len(o.outputs[0].token_ids) for o in outs] == [12] * 4
    assert " Paris" in outs[0].outputs[0].text
    assert outs[1].outputs[0].token_ids != outs[3].outputs[0].token_ids   # the adapter acts
    assert_pool_full(llm)


@pytest.mark.parametrize("quantization", ["gguf", None])
@pytest.mark.parametrize("case", ["llama-tied-bias-mha", "llama-llama3-gqa"])
def test_a_bf16_models_logits_of_few_rows_come_from_its_small_batch_head(
        tmp_path: Path, case: str, quantization: str | None) -> None:
    hf = build_tiny_hf(case)
    path = str(tmp_path / "model.gguf")
    write_gguf_from_hf(path, hf.config, hf.state_dict(), qtype=Q.Q4_1,
                       qtype_of={"embed_tokens": Q.Q8_0, "lm_head": Q.Q8_0})
    cfg = ModelConfig(model=path, dtype="bfloat16", quantization=quantization)
    model = load_model(cfg).model
    assert load_model(ModelConfig(model=path)).model.small_batch_head is None   # fp32
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TASKLOOM_CPU_KERNELS", "0")                # nor with the C kernels off
        assert load_model(cfg).model.small_batch_head is None
    head = model.small_batch_head
    if not small_linear_worthwhile():
        assert head is None
        return
    # the Q8_0 head kept 8-bit with quantization="gguf", else the model's bf16 head itself
    assert type(head) is SmallBatchHead and head.max_rows == SMALL_BATCH_MAX_ROWS
    assert head.holds_copy == (quantization == "gguf")
    hidden = torch.randn(SMALL_BATCH_MAX_ROWS + 1, hf.config.hidden_size).bfloat16()
    bf16 = torch.nn.functional.linear(hidden, model.lm_head_weight()).float()
    # up to max_rows rows through the small-batch head: the bf16 head's logits within a
    # rounding
    few = model.compute_logits(hidden[:SMALL_BATCH_MAX_ROWS])
    assert few.dtype == torch.float32
    torch.testing.assert_close(few, bf16[:SMALL_BATCH_MAX_ROWS], rtol=2 ** -7, atol=1e-3)
    assert torch.equal(head(hidden[:3]).float(), few[:3])
    # above, the bf16 head by F.linear
    assert torch.equal(model.compute_logits(hidden), bf16)


def test_settings_4bit_weights_cannot_run_with_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bfloat16 activations on a CPU .*got float32 on cpu"):
        ModelConfig(quantization="gguf")
    with pytest.raises(ValueError, match="got bfloat16 on cuda"):
        ModelConfig(quantization="gguf", dtype="bfloat16", device="cuda")
    with pytest.raises(ValueError, match="random weights have none"):
        ModelConfig(model="smollm2-135m", random_weights=True, quantization="gguf",
                    dtype="bfloat16")
    with pytest.raises(ValueError, match="quantization must be one of gguf"):
        ModelConfig(quantization="awq", dtype="bfloat16")
    hf = build_tiny_hf("qwen2-bias")
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match="is a Hugging Face directory"):
        load_model(ModelConfig(model=str(tmp_path / "hf"), dtype="bfloat16",
                               quantization="gguf"))


def test_a_file_without_4bit_projections_loads_dequantized(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    hf = build_tiny_hf("qwen2-bias")
    path = str(tmp_path / "q8.gguf")
    write_gguf_from_hf(path, hf.config, hf.state_dict(), qtype=Q.Q8_0)
    model = load_model(ModelConfig(model=path, dtype="bfloat16", quantization="gguf")).model
    assert not any(isinstance(m, Int4Linear) for m in _projections(model))
    assert "stores no decoder projection 4-bit" in caplog.text


def test_a_mixed_file_keeps_its_4bit_projections_and_packs_the_rest(tmp_path: Path) -> None:
    from tests.e2e.conftest import assert_pool_full
    hf = build_tiny_hf("llama-llama3-gqa")
    path = str(tmp_path / "mixed.gguf")
    # as Q4_K_M: some v projections (so their fused q/k/v) and the down projections at
    # more bits than 4
    write_gguf_from_hf(path, hf.config, hf.state_dict(), qtype=Q.Q4_1,
                       qtype_of={"layers.1.self_attn.v_proj": Q.Q8_0, "down_proj": Q.Q8_0})
    llm = LLM(path, dtype="bfloat16", quantization="gguf", num_blocks=32,
              skip_tokenizer_init=True)
    first, second = llm.engine.runner.model.model.layers
    rest = PackedLinear if packing_supported(torch.bfloat16) else torch.nn.Linear
    assert [type(m) for m in (first.self_attn.qkv_proj, first.self_attn.o_proj,
                              first.mlp.gate_up_proj, first.mlp.down_proj)] == \
        [int4_linear_type()] * 3 + [rest]
    assert type(second.self_attn.qkv_proj) is rest and type(second.mlp.down_proj) is rest
    outs = llm.generate(random_prompts(hf.config.vocab_size, seed=2)[:3],
                        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6] * 3
    assert_pool_full(llm)
