"""Hydra heads: a checkpoint as the paper's code saves it (its nn modules' state dict in
hydra_lm_head.pt, the later blocks of a head one shared module as that code builds them)
loads into heads that compute what those modules compute, teacher-forced and drafting a chain;
heads saved without an lm head use the base model's; a save loads back the same; bad
checkpoints are refused with what is wrong; untrained heads guess what the base would."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taskloom.models.arch import ArchConfig
from taskloom.models.draft_train import DraftTrainConfig, new_heads
from taskloom.models.hydra import HydraConfig, HydraHeads, load_hydra, save_hydra
from taskloom.models.llama import LlamaForCausalLM
from tests.models.tiny_models import TINY_LLAMA_CONFIG

ARCH = ArchConfig.from_hf_dict(TINY_LLAMA_CONFIG)
H, V = ARCH.hidden_size, ARCH.vocab_size
CPU = torch.device("cpu")
CONFIG = {"hydra_num_heads": 3, "hydra_num_layers": 3, "hydra_head_arch": "mlp",
          "grounded_heads": True, "hidden_state_offset": 0}


class PaperResBlock(nn.Module):
    """res_connection(x) + SiLU(linear(x)); the first block of head i reads i + 2 vectors."""

    def __init__(self, hidden: int, num_condition: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden * (num_condition + 1), hidden)
        self.res_connection = (nn.Linear(hidden * (num_condition + 1), hidden)
                               if num_condition else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_connection(x) + F.silu(self.linear(x))


class PaperHeads(nn.Module):
    """Grounded Hydra MLP heads as the paper's code builds them (its later blocks are one
    module repeated, `[ResBlock(h)] * (layers - 1)`), with random weights."""

    def __init__(self, num_heads: int, num_layers: int, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hydra_mlp = nn.ModuleList([
            nn.Sequential(PaperResBlock(H, i + 1), *([PaperResBlock(H)] * (num_layers - 1)))
            for i in range(num_heads)])
        self.hydra_lm_head = nn.ModuleList([nn.Linear(H, V) for _ in range(num_heads)])
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.3)

    def chain(self, hidden: torch.Tensor, first: torch.Tensor, embed: torch.Tensor,
              k: int) -> torch.Tensor:
        """The top-1 chain: head i reads [h, E(first), E(d1) .. E(di)]."""
        ctx, out = [hidden, embed[first]], []
        for i in range(k):
            token = self.hydra_lm_head[i](self.hydra_mlp[i](torch.cat(ctx, -1))).argmax(-1)
            out.append(token)
            ctx.append(embed[token])
        return torch.stack(out, 1)

    def forced(self, hidden: torch.Tensor, tokens: torch.Tensor, embed: torch.Tensor
               ) -> list[torch.Tensor]:
        """Head i's logits reading the given tokens[:, :i + 1]."""
        ctx = [hidden] + [embed[tokens[:, j]] for j in range(tokens.shape[1])]
        return [self.hydra_lm_head[i](self.hydra_mlp[i](torch.cat(ctx[:i + 2], -1)))
                for i in range(len(self.hydra_mlp))]


def write_paper_checkpoint(path: Path, heads: PaperHeads, config: dict = CONFIG) -> str:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    torch.save(heads.state_dict(), path / "hydra_lm_head.pt")
    return str(path)


def test_the_papers_checkpoint_computes_its_heads(tmp_path: Path) -> None:
    paper = PaperHeads(3, 3)
    embed = torch.randn(V, H)
    heads = load_hydra(write_paper_checkpoint(tmp_path, paper), ARCH, embed, torch.zeros(0),
                       torch.float32, CPU)
    assert heads.config == HydraConfig(3, 3, H, V, own_lm_heads=True)
    x, tokens = torch.randn(6, H), torch.randint(0, V, (6, 3))
    with torch.no_grad():
        want = paper.forced(x, tokens, embed)
        states = heads.train_states(x, tokens)                          # [K, n, hidden]
        for i in range(3):
            torch.testing.assert_close(heads.head_logits(i, states[i]), want[i],
                                       rtol=1e-5, atol=1e-5)
        for k in (1, 3):
            assert torch.equal(heads.propose(x, tokens[:, 0], k),
                               paper.chain(x, tokens[:, 0], embed, k))


def test_a_save_loads_back_and_uses_the_base_lm_head(tmp_path: Path) -> None:
    base, embed = torch.randn(V, H), torch.randn(V, H)
    heads = HydraHeads(HydraConfig(2, 2, H, V), embed, base, torch.float32, CPU)
    with torch.no_grad():
        for p in heads.trainable():
            p.normal_(0, 0.3)
    save_hydra(heads, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["use_base_lm_head"] and config["hydra_num_heads"] == 2
    loaded = load_hydra(str(tmp_path), ARCH, embed, base, torch.float32, CPU)
    assert loaded.config == heads.config and loaded.lm_weight is None
    x, first = torch.randn(5, H), torch.randint(0, V, (5,))
    assert torch.equal(loaded.propose(x, first, 2), heads.propose(x, first, 2))
    state = loaded.train_states(x, first[:, None].expand(5, 2))[0]
    torch.testing.assert_close(loaded.head_logits(0, state), F.linear(state, base))


def test_untrained_heads_guess_what_the_base_would(tmp_path: Path) -> None:
    model = LlamaForCausalLM(ARCH)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    heads = new_heads(model, DraftTrainConfig(method="hydra", num_heads=3, num_layers=2))
    x = torch.randn(4, H)
    guess = model.compute_logits(x).argmax(-1)
    assert torch.equal(heads.propose(x, torch.randint(0, V, (4,)), 3),
                       guess[:, None].expand(4, 3))


@pytest.mark.parametrize("change,error", [
    ({"hydra_head_arch": "prefix-mlp"}, "architecture 'prefix-mlp' is not supported"),
    ({"grounded_heads": False}, "ungrounded Hydra heads"),
    ({"hidden_state_offset": 1}, "hidden_state_offset 1 is not supported"),
    ({"hidden_size": H + 1}, f"hidden_size {H + 1} do not fit the model"),
    ({"hydra_num_heads": 4}, "lacks tensor 'hydra_mlp.3.0.res_connection.weight'"),
    ({"hydra_num_heads": 2}, "unexpected tensor 'hydra_lm_head.2.bias'"),
    ({"hydra_num_layers": 1}, "unexpected tensor 'hydra_mlp.0.1.linear.bias'"),
    ({"use_base_lm_head": True}, "unexpected tensor 'hydra_lm_head.0.bias'"),
])
def test_bad_checkpoints_are_refused(tmp_path: Path, change: dict, error: str) -> None:
    path = write_paper_checkpoint(tmp_path, PaperHeads(3, 2), {**CONFIG, "hydra_num_layers": 2,
                                                               **change})
    with pytest.raises(ValueError, match=error):
        load_hydra(path, ARCH, torch.zeros(V, H), torch.zeros(V, H), torch.float32, CPU)


def test_misshapen_and_missing_files_are_refused(tmp_path: Path) -> None:
    paper = PaperHeads(2, 1)
    with torch.no_grad():
        paper.hydra_lm_head[1] = nn.Linear(H, V - 1)
    path = write_paper_checkpoint(tmp_path / "bad", paper, {**CONFIG, "hydra_num_heads": 2,
                                                            "hydra_num_layers": 1})
    with pytest.raises(ValueError, match=r"hydra_lm_head.1.weight has shape \(1023, 64\)"):
        load_hydra(path, ARCH, torch.zeros(V, H), torch.zeros(V, H), torch.float32, CPU)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(ValueError, match="has no model.safetensors or hydra_lm_head.pt"):
        load_hydra(str(tmp_path / "empty"), ARCH, torch.zeros(V, H), torch.zeros(V, H),
                   torch.float32, CPU)
    (tmp_path / "medusa").mkdir()
    (tmp_path / "medusa" / "config.json").write_text(json.dumps({"num_heads": 2}))
    with pytest.raises(ValueError, match="is not a Hydra config: expected 'hydra_num_heads'"):
        load_hydra(str(tmp_path / "medusa"), ARCH, torch.zeros(V, H), torch.zeros(V, H),
                   torch.float32, CPU)
