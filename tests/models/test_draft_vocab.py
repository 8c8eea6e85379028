"""Draft heads over the most frequent tokens only: the vocabulary's mappings, the choice of
the tokens, and heads of both kinds that guess, among those tokens, what heads over the whole
vocabulary guess once every other token is masked out; vLLM's `token_map` layout for Medusa
and the same keys for Hydra load back what was saved."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from taskloom.models.arch import ArchConfig
from taskloom.models.draft_vocab import IGNORE, DraftVocab, most_frequent
from taskloom.models.hydra import HydraConfig, HydraHeads, load_hydra, save_hydra
from taskloom.models.medusa import MedusaConfig, MedusaHeads, load_medusa, save_medusa
from tests.models.tiny_models import TINY_LLAMA_CONFIG

ARCH = ArchConfig.from_hf_dict(TINY_LLAMA_CONFIG)
H, V = ARCH.hidden_size, ARCH.vocab_size
CPU = torch.device("cpu")
MAP = torch.tensor([7, 3, 900, 15, 64, 1, 512, 2])


def test_the_vocabulary_maps_both_ways() -> None:
    vocab = DraftVocab(V, MAP)
    assert vocab.size == 8
    assert vocab.ids(torch.tensor([0, 2, 7])).tolist() == [7, 900, 2]
    assert vocab.index(torch.tensor([900, 5, 2, IGNORE])).tolist() == [2, IGNORE, 7, IGNORE]
    weight = torch.randn(V, H)
    assert torch.equal(vocab.rows(weight), weight[MAP])
    whole = DraftVocab(V)
    assert whole.size == V and whole.rows(weight) is weight
    for bad, error in [(torch.tensor([1, 1]), "an id twice"),
                       (torch.tensor([V]), "outside 0..1023"),
                       (torch.tensor([], dtype=torch.int64), "of 0 tokens")]:
        with pytest.raises(ValueError, match=error):
            DraftVocab(V, bad)


def test_the_most_frequent_tokens_are_kept() -> None:
    kept = most_frequent([[5, 5, 9, 2], [9, 5, 2, 7]], vocab_size=10, size=6)
    # 3 times, 2 and 2 (ties to the smaller id), once, then ids never written, in order
    assert kept.tolist() == [5, 2, 9, 7, 0, 1]


def masked_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the tokens of MAP only, of full-vocabulary logits [..., vocab]."""
    mask = torch.full((V,), float("-inf"))
    mask[MAP] = 0
    return (logits + mask).argmax(-1)


def random_(params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.3)


def test_truncated_medusa_heads_guess_the_masked_argmax(tmp_path: Path) -> None:
    base = torch.randn(V, H)
    full = MedusaHeads(MedusaConfig(2, 1, H, V), base, torch.float32, CPU)
    random_(full.trainable())
    cut = MedusaHeads(MedusaConfig(2, 1, H, V, truncated_vocab_size=8), base, torch.float32,
                      CPU, MAP)
    cut.load_state_dict(full.state_dict())
    x = torch.randn(5, H)
    sampled = torch.zeros(5, dtype=torch.int64)
    want = masked_argmax(F.linear(full.hidden(x), base)).T                  # [n, K]
    assert torch.equal(cut.propose(x, sampled, 2), want)
    save_medusa(cut, str(tmp_path))
    loaded = load_medusa(str(tmp_path), ARCH, base, torch.float32, CPU)
    assert loaded.config.truncated_vocab_size == 8
    assert torch.equal(loaded.vocab.token_map, MAP)
    assert torch.equal(loaded.propose(x, sampled, 2), want)


def test_truncated_hydra_heads_draft_the_masked_chain(tmp_path: Path) -> None:
    base, embed = torch.randn(V, H), torch.randn(V, H)
    full = HydraHeads(HydraConfig(3, 2, H, V), embed, base, torch.float32, CPU)
    random_(full.trainable())
    cut = HydraHeads(HydraConfig(3, 2, H, V, truncated_vocab_size=8), embed, base,
                     torch.float32, CPU, MAP)
    cut.load_state_dict(full.state_dict())
    x, sampled = torch.randn(5, H), torch.randint(0, V, (5,))
    ctx, want = [x, embed[sampled]], []                 # the full heads' chain, masked
    for i in range(3):
        token = masked_argmax(full.head_logits(i, full.head_state(i, torch.cat(ctx, -1))))
        want.append(token)
        ctx.append(embed[token])
    assert torch.equal(cut.propose(x, sampled, 3), torch.stack(want, 1))
    save_hydra(cut, str(tmp_path))
    loaded = load_hydra(str(tmp_path), ARCH, embed, base, torch.float32, CPU)
    assert loaded.config == cut.config
    assert torch.equal(loaded.propose(x, sampled, 3), torch.stack(want, 1))
