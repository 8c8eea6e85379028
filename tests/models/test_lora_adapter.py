"""Loading PEFT adapters: what fits the model loads with the right scaling; everything that
does not is refused with a message that names it (no torch model needed)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from taskloom.lora.adapter import load_peft_adapter, lora_scaling
from taskloom.lora.random_adapter import write_random_adapter
from taskloom.models.arch import ArchConfig

ARCH = ArchConfig.from_hf_dict({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256})
OTHER = ArchConfig.from_hf_dict({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256})


def adapter(tmp_path: Path, arch: ArchConfig = ARCH, rank: int = 4, **config: object) -> str:
    path = write_random_adapter(str(tmp_path / "a"), arch, rank, seed=0, lora_alpha=8)
    if config:
        file = Path(path) / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return path


def edit_tensors(path: str, fn) -> None:
    file = f"{path}/adapter_model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file)


def test_a_fitting_adapter_loads_every_projection_with_its_scaling(tmp_path: Path) -> None:
    loaded = load_peft_adapter("a", adapter(tmp_path), ARCH, max_rank=16)
    assert loaded.rank == 4 and loaded.scaling == 2.0
    assert len(loaded.weights) == 2 * 7 and loaded.weights[(1, "gate_proj")].b.shape == (96, 4)
    rs = load_peft_adapter("a", adapter(tmp_path, use_rslora=True), ARCH, max_rank=16)
    assert rs.scaling == lora_scaling(8, 4, True) == 4.0


@pytest.mark.parametrize("config,words", [
    ({"use_dora": True}, "use_dora=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "targets embed_tokens"),
])
def test_what_taskloom_cannot_serve_is_named(tmp_path: Path, config: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        load_peft_adapter("a", adapter(tmp_path, **config), ARCH, max_rank=16)


def test_shapes_layers_ranks_and_stray_tensors_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"down_proj.lora_A.weight has shape \(4, 80\), "
                                         r"expected \(4, 96\)"):
        load_peft_adapter("a", adapter(tmp_path, OTHER), ARCH, max_rank=16)
    with pytest.raises(ValueError, match="rank 4, but this engine serves ranks 1 to 2"):
        load_peft_adapter("a", adapter(tmp_path), ARCH, max_rank=2)
    path = adapter(tmp_path)
    edit_tensors(path, lambda t: t.update({
        "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
        "base_model.model.model.layers.5.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4)}))
    with pytest.raises(ValueError, match="adapts layer 5, but the model has 2 layers"):
        load_peft_adapter("a", path, ARCH, max_rank=16)
    path = adapter(tmp_path)
    edit_tensors(path, lambda t: t.update({"base_model.model.lm_head.lora_A.weight":
                                           torch.zeros(4, 64)}))
    with pytest.raises(ValueError, match="lm_head.lora_A.weight.*not a LoRA A/B matrix"):
        load_peft_adapter("a", path, ARCH, max_rank=16)
    path = adapter(tmp_path)
    edit_tensors(path, lambda t: t.pop(
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"))
    with pytest.raises(ValueError, match="layer 0 down_proj has lora_A but not its other"):
        load_peft_adapter("a", path, ARCH, max_rank=16)
    with pytest.raises(ValueError, match="not a PEFT adapter directory"):
        load_peft_adapter("a", str(tmp_path / "nothing"), ARCH, max_rank=16)


def test_host_cache_keeps_the_model_dtype_and_slots_hold_the_scaled_update(
        tmp_path: Path) -> None:
    """A bf16 engine keeps its adapters' host copies in bf16 (half of float32's memory); a
    slot holds A and scaling * B, up to bf16 rounding."""
    from taskloom import LLM, SamplingParams
    from taskloom.models.loader import random_arch
    from tests.models.tiny_models import write_tiny_config

    config = write_tiny_config(tmp_path)
    arch, _ = random_arch(config)
    path = write_random_adapter(str(tmp_path / "a"), arch, rank=4, seed=1, lora_alpha=8.0)
    llm = LLM(config, random_weights=True, dtype="bfloat16", num_blocks=32, block_size=4,
              loras={"a": path}, max_loras=1)
    manager = llm.engine.runner.lora
    (held,) = manager._host.values()
    assert {w.a.dtype for w in held.weights.values()} == {torch.bfloat16}
    out = llm.generate([1, 2, 3], SamplingParams(max_tokens=2), use_tqdm=False, lora="a")[0]
    assert out.error is None and len(out.outputs[0].token_ids) == 2
    exact = load_peft_adapter("a", path, arch, max_rank=16)
    qkv = manager.layers[0]              # layer 0's fused q/k/v: q_proj's rows come first
    w = exact.weights[(0, "q_proj")]
    slot = manager._slots[llm.loras.resolve("a").lora_id]
    torch.testing.assert_close(qkv.lora_a[slot, :4].float(), w.a, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(qkv.lora_b[slot, :arch.q_size, :4].float(),
                               w.b * exact.scaling, rtol=2e-2, atol=1e-3)
    assert exact.scaling == 2.0
