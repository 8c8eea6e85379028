"""The draft-head trainer's data and losses: each training position's row of the base's states
and its tokens line up (the state at row + j is the one that produced token j), and teacher
distillation is cross-entropy against the base's softmax, so against a one-hot teacher it is
the hard-label loss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from taskloom.models import draft_train
from taskloom.models.draft_train import DraftTrainConfig, training_pairs


def test_rows_and_tokens_line_up() -> None:
    # two sequences: prompt 3 + answer 4, prompt 2 + answer 1 (too short to train on), then
    # prompt 2 + answer 3; each state is its position's number, so rows can be read back
    seqs = [([10, 11, 12, 13, 14, 15, 16], 3), ([20, 21, 22], 2), ([30, 31, 32, 33, 34], 2)]
    hiddens = [torch.arange(len(ids), dtype=torch.float32)[:, None] + 100 * n
               for n, (ids, _) in enumerate(seqs)]
    states, rows, tokens = training_pairs(seqs, hiddens, num_heads=2)
    assert states.shape == (15, 1)
    # positions p = prompt_len - 1 .. len - 3 of sequences 0 and 2
    assert states[rows, 0].tolist() == [2, 3, 4, 201, 202]
    assert tokens.tolist() == [[13, 14, 15], [14, 15, 16], [15, 16, -100],
                               [32, 33, 34], [33, 34, -100]]
    assert rows.tolist() == [2, 3, 4, 11, 12]       # sequence 2 starts at row 7 + 3 = 10


def test_distillation_against_a_one_hot_teacher_is_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    vocab, hidden = 11, 4
    states = torch.randn(6, hidden, generator=g)
    teacher = torch.randn(vocab, hidden, generator=g) * 1e4          # a softmax of one-hots
    target = F.linear(states, teacher).argmax(-1)
    target[2] = -100
    logits = torch.randn(6, vocab, generator=g)
    at = torch.arange(6)
    hard = draft_train._head_loss(logits, target, None, states, at)
    soft = draft_train._head_loss(logits, target, teacher, states, at)
    torch.testing.assert_close(soft, hard)
    assert soft != draft_train._head_loss(logits, target, teacher / 1e4, states, at)


def test_bad_training_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="loss must be one of ce, distill, got 'kl'"):
        DraftTrainConfig(loss="kl")
    with pytest.raises(ValueError, match="method must be one of medusa, hydra, got 'eagle'"):
        DraftTrainConfig(method="eagle")


def test_rank_accuracy_counts_where_each_heads_guesses_put_the_token() -> None:
    """Untrained Medusa heads guess what the base's lm head makes of the state; targets
    placed at known ranks of those logits come back as those ranks' shares."""
    from taskloom.models.medusa import MedusaConfig, MedusaHeads
    gen = torch.Generator().manual_seed(0)
    n, h, v = 40, 16, 50
    lm = torch.randn(v, h, generator=gen)
    heads = MedusaHeads(MedusaConfig(2, 1, h, v), lm, torch.float32, torch.device("cpu"))
    states = torch.randn(n, h, generator=gen)
    order = (states @ lm.T).argsort(dim=1, descending=True)             # [n, v] best first
    ranks = torch.tensor([0] * 20 + [1] * 10 + [3] * 6 + [9] * 4)       # head 0's targets
    y = torch.full((n, 3), -100, dtype=torch.int64)
    y[:, 1] = order[torch.arange(n), ranks]
    y[:30, 2] = order[:30, 2]                                           # head 1: rank 2, 30 of them
    acc = draft_train.rank_accuracy(heads, states, torch.arange(n), y, num_ranks=4,
                                    batch_tokens=16)
    assert acc[0] == [0.5, 0.25, 0.0, 0.15]     # rank 9 is past the 4 measured
    assert acc[1] == [0.0, 0.0, 1.0, 0.0]       # positions without a target do not count


def test_sharegpt_conversations_give_a_prompt_per_human_turn() -> None:
    turns = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
             {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"}]
    first, second = draft_train.sharegpt_prompts(turns, "f.jsonl:1")
    assert first == [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}]
    assert second[-2:] == [{"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Bye"}]
    with pytest.raises(ValueError, match=r"f.jsonl:2: a ShareGPT turn needs \"from\""):
        draft_train.sharegpt_prompts([{"from": "narrator", "value": "x"}], "f.jsonl:2")


def test_sampled_answers_are_several_per_prompt_and_seeded(tmp_path) -> None:
    from taskloom import LLM
    from tests.models.tiny_models import write_tiny_config
    llm = LLM(write_tiny_config(tmp_path), random_weights=True, num_blocks=32)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    seqs = draft_train.self_distill(llm, prompts, 12, samples=3, temperature=1.0, seed=4)
    assert [n for _, n in seqs] == [4, 4, 4, 3, 3, 3]
    assert all(s[:n] == prompts[i // 3] and len(s) == n + 12 for i, (s, n) in enumerate(seqs))
    assert len({tuple(s) for s, _ in seqs[:3]}) > 1          # sampled: not all alike
    assert seqs == draft_train.self_distill(llm, prompts, 12, samples=3, temperature=1.0,
                                            seed=4)          # and seeded
    assert len(draft_train.self_distill(llm, prompts, 12)) == 2      # greedy: one each
    with pytest.raises(ValueError, match="needs a temperature"):
        DraftTrainConfig(samples_per_prompt=2)
