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
