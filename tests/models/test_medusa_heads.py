"""Medusa heads: both checkpoint layouts (vLLM's and FasterDecoding's) load into heads that
compute what the paper's modules compute (nn.Linear residual blocks, then an lm head), the
base model's lm head serves heads saved without one, a save loads back the same, and bad
checkpoints are refused with what is wrong."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from taskloom.models.arch import ArchConfig
from taskloom.models import medusa
from taskloom.models.medusa import MedusaConfig, MedusaHeads, load_medusa, save_medusa
from tests.models.tiny_models import TINY_LLAMA_CONFIG

ARCH = ArchConfig.from_hf_dict(TINY_LLAMA_CONFIG)
H, V = ARCH.hidden_size, ARCH.vocab_size
CPU = torch.device("cpu")


def random_tensors(num_heads: int, num_layers: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A FasterDecoding-shaped state dict: head i = ResBlocks i.0 .. i.{L-1}, lm head i.L."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(num_heads):
        for j in range(num_layers):
            out[f"{i}.{j}.linear.weight"] = torch.randn(H, H, generator=g) * 0.2
            out[f"{i}.{j}.linear.bias"] = torch.randn(H, generator=g) * 0.2
        out[f"{i}.{num_layers}.weight"] = torch.randn(V, H, generator=g)
    return out


def next_tokens(x: torch.Tensor) -> torch.Tensor:
    """Some tokens the base sampled from x [n, hidden]: a Medusa head reads none of them."""
    return torch.randint(0, V, (x.shape[0],))


def reference_logits(tensors: dict[str, torch.Tensor], num_heads: int, num_layers: int,
                     x: torch.Tensor) -> torch.Tensor:
    """The paper's heads: x + SiLU(W x + b) per block, then head i's lm head."""
    out = []
    for i in range(num_heads):
        h = x
        for j in range(num_layers):
            h = h + F.silu(F.linear(h, tensors[f"{i}.{j}.linear.weight"],
                                    tensors[f"{i}.{j}.linear.bias"]))
        out.append(F.linear(h, tensors[f"{i}.{num_layers}.weight"]))
    return torch.stack(out)


def write(directory: Path, config: dict, tensors: dict[str, torch.Tensor], name: str) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / name))
    return str(directory)


def as_vllm(tensors: dict[str, torch.Tensor], num_heads: int, num_layers: int
            ) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(num_heads):
        for j in range(num_layers):
            out[f"blocks.{i}.layers.{j}.weight"] = tensors[f"{i}.{j}.linear.weight"]
            out[f"blocks.{i}.layers.{j}.bias"] = tensors[f"{i}.{j}.linear.bias"]
        out[f"lm_heads.{i}.weight"] = tensors[f"{i}.{num_layers}.weight"]
    return out


@pytest.mark.parametrize("layout", ["faster-decoding", "vllm"])
def test_both_layouts_compute_the_papers_heads(tmp_path: Path, layout: str) -> None:
    tensors = random_tensors(3, 2)
    if layout == "vllm":
        path = write(tmp_path, {"architectures": ["MedusaModel"], "num_heads": 3,
                                "num_hidden_layers": 2, "hidden_size": H, "vocab_size": V,
                                "medusa_fc_bias": True}, as_vllm(tensors, 3, 2),
                     "model.safetensors")
    else:
        path = write(tmp_path, {"medusa_num_heads": 3, "medusa_num_layers": 2}, tensors,
                     "medusa_lm_head.safetensors")
    heads = load_medusa(path, ARCH, torch.zeros(V, H), torch.float32, CPU)
    x = torch.randn(5, H)
    want = reference_logits(tensors, 3, 2, x)                      # [K, n, vocab]
    torch.testing.assert_close(heads.logits(x), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(heads.propose(x, next_tokens(x), 2), want.argmax(-1).T[:, :2])


def test_heads_without_an_lm_head_use_the_base_models(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    base = torch.randn(V, H)
    cfg = MedusaConfig(2, 1, H, V, bias=True, num_lm_heads=0)
    heads = MedusaHeads(cfg, base, torch.float32, CPU)
    with torch.no_grad():
        heads.weight.normal_(0, 0.2)
        heads.bias.normal_(0, 0.2)
    save_medusa(heads, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["original_lm_head"] and config["num_heads"] == 2
    loaded = load_medusa(str(tmp_path), ARCH, base, torch.float32, CPU)
    assert loaded.config == cfg and loaded.lm_heads is None
    x = torch.randn(4, H)
    torch.testing.assert_close(loaded.logits(x), heads.logits(x))
    want = loaded.logits(x).argmax(-1).T                    # [n, K]
    sampled = next_tokens(x)
    assert torch.equal(loaded.propose(x, sampled, 2), want)     # one matmul for both heads
    monkeypatch.setattr(medusa, "PROPOSE_MAX_LOGITS", 0)
    assert torch.equal(loaded.propose(x, sampled, 2), want)     # one head at a time
    assert torch.equal(loaded.propose(x, sampled, 1), want[:, :1])
    zero = MedusaHeads(cfg, base, torch.float32, CPU)      # zero blocks: the base's own guess
    assert torch.equal(zero.propose(x, sampled, 2),
                       F.linear(x, base).argmax(-1)[:, None].expand(4, 2))


def test_one_shared_lm_head(tmp_path: Path) -> None:
    tensors = as_vllm(random_tensors(2, 1), 2, 1)
    del tensors["lm_heads.1.weight"]
    path = write(tmp_path, {"num_heads": 2, "num_hidden_layers": 1, "medusa_fc_bias": True,
                            "original_lm_head": True}, tensors, "model.safetensors")
    heads = load_medusa(path, ARCH, torch.zeros(V, H), torch.float32, CPU)
    assert heads.lm_heads is not None and heads.lm_heads.shape == (1, V, H)
    assert torch.equal(heads.lm_weight(1), tensors["lm_heads.0.weight"])


@pytest.mark.parametrize("config, change, error", [
    ({"num_heads": 2, "num_hidden_layers": 1, "hidden_size": H * 2}, None,
     "do not fit the model"),
    ({"hidden_size": H}, None, "not a Medusa config"),
    ({"num_heads": 2, "num_hidden_layers": 1, "medusa_fc_bias": True}, "drop",
     "lacks 1 tensors"),
    ({"num_heads": 2, "num_hidden_layers": 1, "medusa_fc_bias": True}, "extra",
     "unexpected tensor 'blocks.2.layers.0.weight'"),
    ({"num_heads": 2, "num_hidden_layers": 1, "medusa_fc_bias": True}, "shape",
     "has shape"),
    ({"num_heads": 2, "num_hidden_layers": 1, "truncated_vocab_size": 10}, None,
     "truncated_vocab_size 10, no token_map"),
    ({"num_heads": 2, "num_hidden_layers": 1}, "token_map",
     "truncated_vocab_size None, a token_map"),
])
def test_bad_checkpoints_are_refused(tmp_path: Path, config: dict, change: str | None,
                                     error: str) -> None:
    tensors = as_vllm(random_tensors(2, 1), 2, 1)
    if change == "drop":
        del tensors["blocks.1.layers.0.bias"]
    elif change == "extra":
        tensors["blocks.2.layers.0.weight"] = torch.zeros(H, H)
    elif change == "shape":
        tensors["blocks.0.layers.0.weight"] = torch.zeros(H, H + 1)
    elif change == "token_map":
        tensors["token_map"] = torch.arange(10)
    path = write(tmp_path, config, tensors, "model.safetensors")
    with pytest.raises(ValueError, match=error):
        load_medusa(path, ARCH, torch.zeros(V, H), torch.float32, CPU)


def test_a_directory_without_heads_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_medusa(str(tmp_path), ARCH, torch.zeros(V, H), torch.float32, CPU)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no model.safetensors"):
        load_medusa(str(tmp_path), ARCH, torch.zeros(V, H), torch.float32, CPU)
