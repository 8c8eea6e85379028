"""Tests of the vectorised sampler against independent per-row computations.

Greedy, penalties, min_tokens, filtering and logprobs are checked exactly (or to float32
rounding) against plain Python references; sampling is checked by chi-square tests with fixed
seeds and by per-request seed reproducibility across batch compositions.
"""
from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from taskloom.runtime.sampler import (
    LogprobsTensors,
    Sampler,
    apply_penalties,
    compute_prompt_logprobs,
    draw_seed,
    output_token_counts,
    sampling_probs,
)
from taskloom.sampling_params import SamplingParams

CPU = torch.device("cpu")
DEVICES = [
    pytest.param(CPU, id="cpu"),
    pytest.param(torch.device("cuda"), id="cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]),
]

# Upper 0.1% quantiles of the chi-square distribution (p = 1e-3) for 1..7 degrees of freedom.
CHI2_CRITICAL_P1E3 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458,
                      7: 24.322}


def make_sampler(vocab: int, requests: dict[str, SamplingParams],
                 prompts: dict[str, list[int]] | None = None,
                 stop_ids: tuple[int, ...] = (), device: torch.device = CPU) -> Sampler:
    sampler = Sampler(vocab, device)
    for req_id, params in requests.items():
        prompt = (prompts or {}).get(req_id, [0])
        sampler.add_request(req_id, params, prompt, stop_ids + tuple(params.stop_token_ids))
    return sampler


def reference_penalised(logits: list[float], prompt: list[int], output: list[int],
                        params: SamplingParams) -> list[float]:
    """HF repetition penalty over prompt + output, OpenAI presence/frequency over output."""
    out = list(logits)
    for token in set(prompt) | set(output):
        p = params.repetition_penalty
        out[token] = out[token] / p if out[token] > 0 else out[token] * p
    for token in set(output):
        count = output.count(token)
        out[token] -= params.presence_penalty + params.frequency_penalty * count
    return out


def reference_probs(logits: list[float], params: SamplingParams) -> list[float]:
    """Temperature, then top-k, top-p, min-p, each on the renormalised survivors (float64)."""
    x = [v / params.temperature for v in logits]
    keep = [True] * len(x)

    def normalised(kept: list[bool]) -> list[float]:
        top = max(v for v, k in zip(x, kept) if k)
        weights = [math.exp(v - top) if k else 0.0 for v, k in zip(x, kept)]
        total = sum(weights)
        return [w / total for w in weights]

    if params.top_k > 0:
        kth = sorted(x, reverse=True)[min(params.top_k, len(x)) - 1]
        keep = [v >= kth for v in x]
    if params.top_p < 1:
        probs = normalised(keep)
        kept_p = [False] * len(x)
        cumulative = 0.0
        for i in sorted(range(len(x)), key=lambda i: -probs[i]):
            if not keep[i] or cumulative >= params.top_p:
                break
            kept_p[i] = True
            cumulative += probs[i]
        keep = kept_p
    if params.min_p > 0:
        probs = normalised(keep)
        keep = [k and p >= params.min_p * max(probs) for k, p in zip(keep, probs)]
    return normalised(keep)


def param_columns(params: list[SamplingParams]) -> tuple[torch.Tensor, ...]:
    return (torch.tensor([p.temperature for p in params]),
            torch.tensor([p.top_k for p in params]),
            torch.tensor([p.top_p for p in params]),
            torch.tensor([p.min_p for p in params]))


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_is_argmax_with_lowest_index_on_ties(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 40, generator=gen)                    # [12, 40]
    logits[3, 7] = logits[3, 30] = logits[3].max() + 1.0           # tie: lowest index wins
    logits[5, :] = 0.5                                             # all tied: index 0
    ids = [f"g{i}" for i in range(12)]
    sampler = make_sampler(40, {r: SamplingParams(temperature=0.0) for r in ids}, device=device)
    sampled = sampler(logits.to(device), ids, [[] for _ in ids]).sampled.cpu()
    expected = [max(range(40), key=lambda j, row=row: (row[j], -j)) for row in logits.tolist()]
    assert sampled.tolist() == expected
    assert sampled[3].item() == 7 and sampled[5].item() == 0


def test_penalties_match_per_row_reference() -> None:
    rng = random.Random(1)
    vocab, rows = 30, 10
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=0.0, repetition_penalty=rng.choice([1.0, 1.3, 0.7]),
                             presence_penalty=rng.choice([0.0, 0.8, -0.5]),
                             frequency_penalty=rng.choice([0.0, 0.4, -1.2]))
              for _ in range(rows)]
    prompts = [[rng.randrange(vocab) for _ in range(rng.randrange(1, 8))] for _ in range(rows)]
    outputs = [[rng.randrange(vocab) for _ in range(rng.randrange(0, 12))] for _ in range(rows)]
    prompt_mask = output_token_counts(prompts, vocab, CPU) > 0     # [rows, vocab]
    got = apply_penalties(logits, prompt_mask, output_token_counts(outputs, vocab, CPU),
                          torch.tensor([p.repetition_penalty for p in params]),
                          torch.tensor([p.presence_penalty for p in params]),
                          torch.tensor([p.frequency_penalty for p in params]))
    expected = torch.tensor([reference_penalised(logits[i].tolist(), prompts[i], outputs[i],
                                                 params[i]) for i in range(rows)])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_penalties_decide_greedy_choice_in_the_sampler() -> None:
    """Penalties move the argmax exactly as the reference does, across many random rows."""
    rng = random.Random(2)
    vocab, rows = 16, 200
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(2)) * 2
    requests, prompts, outputs = {}, {}, []
    for i in range(rows):
        top = logits[i].topk(3).indices.tolist()
        requests[f"r{i}"] = SamplingParams(
            temperature=0.0, repetition_penalty=rng.choice([1.0, 1.5, 3.0]),
            presence_penalty=rng.choice([0.0, 1.0, 2.0]), frequency_penalty=rng.choice([0, 0.7]))
        prompts[f"r{i}"] = [rng.choice(top)]
        outputs.append([rng.choice(top) for _ in range(rng.randrange(0, 4))])
    sampler = make_sampler(vocab, requests, prompts)
    sampled = sampler(logits, list(requests), outputs).sampled.tolist()
    expected = []
    for i, req_id in enumerate(requests):
        row = reference_penalised(logits[i].tolist(), prompts[req_id], outputs[i],
                                  requests[req_id])
        expected.append(max(range(vocab), key=lambda j, row=row: (row[j], -j)))
    assert sampled == expected
    assert sum(s != a for s, a in zip(sampled, logits.argmax(-1).tolist())) > rows // 4


def test_presence_ignores_prompt_and_repetition_covers_it() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 1.0]])                  # [1, 4]
    presence = make_sampler(4, {"a": SamplingParams(temperature=0.0, presence_penalty=2.0)},
                            {"a": [1, 1, 1]})
    assert presence(logits, ["a"], [[]]).sampled.item() == 1       # prompt does not count
    assert presence(logits, ["a"], [[1]]).sampled.item() == 2      # output does
    repetition = make_sampler(4, {"a": SamplingParams(temperature=0.0, repetition_penalty=1.5)},
                              {"a": [1]})
    assert repetition(logits, ["a"], [[]]).sampled.item() == 2     # 3.0 / 1.5 < 2.5


def test_min_tokens_masks_stop_ids_until_reached() -> None:
    vocab, eos = 8, 0
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0, 0.0, 4.0, 0.0, 3.0]])  # [1, 8]
    greedy = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[5])
    sampler = make_sampler(vocab, {"a": greedy, "b": SamplingParams(temperature=0.0)},
                           stop_ids=(eos,))
    both = logits.expand(2, vocab)                                 # [2, 8]
    for length, expected in [(0, 7), (1, 7), (2, 7), (3, 0), (9, 0)]:
        out = sampler(both, ["a", "b"], [[2] * length, [2] * length]).sampled.tolist()
        assert out == [expected, 0], length
    hot = SamplingParams(temperature=5.0, min_tokens=2, stop_token_ids=[5])
    ids = [f"s{i}" for i in range(2000)]
    sampled_rows = make_sampler(vocab, {r: hot for r in ids}, stop_ids=(eos,))
    many = logits.expand(2000, vocab)                              # [2000, 8]
    torch.manual_seed(3)
    early = sampled_rows(many, ids, [[1]] * 2000).sampled
    late = sampled_rows(many, ids, [[1, 1]] * 2000).sampled
    assert not torch.isin(early, torch.tensor([eos, 5])).any()
    assert torch.isin(late, torch.tensor([eos, 5])).any()


FILTER_PARAMS = [
    SamplingParams(temperature=0.7, top_k=5),
    SamplingParams(temperature=1.0, top_p=0.6),
    SamplingParams(temperature=1.5, min_p=0.2),
    SamplingParams(temperature=0.9, top_k=12, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.2, top_k=3, top_p=0.95),
    SamplingParams(temperature=0.8),
    SamplingParams(temperature=2.0, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.3, min_p=0.5),
]


def test_filtered_distribution_matches_reference() -> None:
    vocab = 32
    logits = torch.randn(len(FILTER_PARAMS), vocab,
                         generator=torch.Generator().manual_seed(4)) * 2  # [8, 32]
    probs = sampling_probs(logits, *param_columns(FILTER_PARAMS))  # [8, 32]
    for i, params in enumerate(FILTER_PARAMS):
        expected = reference_probs(logits[i].tolist(), params)
        assert (probs[i] > 0).tolist() == [p > 0 for p in expected], params
        torch.testing.assert_close(probs[i].double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)


def test_sampled_tokens_stay_inside_the_kept_set() -> None:
    vocab, copies = 32, 300
    logits = torch.randn(len(FILTER_PARAMS), vocab,
                         generator=torch.Generator().manual_seed(5)) * 2  # [8, 32]
    requests = {f"r{i}_{c}": FILTER_PARAMS[i] for c in range(copies)
                for i in range(len(FILTER_PARAMS))}
    sampler = make_sampler(vocab, requests)
    rows = logits.repeat(copies, 1)                                # [8 * copies, 32]
    torch.manual_seed(5)
    for _ in range(5):
        sampled = sampler(rows, list(requests), [[]] * len(requests)).sampled
        for i, params in enumerate(FILTER_PARAMS):
            kept = {j for j, p in enumerate(reference_probs(logits[i].tolist(), params)) if p > 0}
            assert set(sampled[i::len(FILTER_PARAMS)].tolist()) <= kept, params


def test_top_k_keeps_ties_and_top_p_one_keeps_everything() -> None:
    tied = torch.tensor([[3.0, 2.0, 2.0, 1.0]])                    # [1, 4]
    probs = sampling_probs(tied, torch.tensor([1.0]), torch.tensor([2]), None, None)
    assert (probs[0] > 0).tolist() == [True, True, True, False]
    peaked = torch.zeros(2, 1000)                                  # [2, 1000]
    peaked[:, 0] = 30.0                                            # cumulative hits 1.0 early
    probs = sampling_probs(peaked, torch.ones(2), None, torch.tensor([1.0, 0.5]), None)
    assert bool((probs[0] > 0).all())
    assert (probs[1] > 0).sum().item() == 1


CHI2_LOGITS = [2.0, 1.5, 1.2, 0.8, 0.5, 0.1, -0.5, -1.0]
CHI2_CASES = [
    (SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05), False),
    (SamplingParams(temperature=1.3, top_p=0.8), False),
    (SamplingParams(temperature=0.5, top_k=5, min_p=0.1), True),
    (SamplingParams(temperature=1.0, top_k=7, top_p=0.97, min_p=0.02), True),
    (SamplingParams(temperature=1.0), False),
]


def chi_square(counts: list[int], expected_probs: list[float], n: int) -> tuple[float, int]:
    """Pearson's statistic over the kept tokens and its degrees of freedom."""
    cells = [(c, p * n) for c, p in zip(counts, expected_probs) if p > 0]
    assert all(e >= 5 for _, e in cells), "expected counts too small for a chi-square test"
    return sum((c - e) ** 2 / e for c, e in cells), len(cells) - 1


@pytest.mark.parametrize(("params", "seeded"), CHI2_CASES)
def test_sample_frequencies_chi_square(params: SamplingParams, seeded: bool) -> None:
    """20k draws (one per row; unseeded rows from the global RNG, seeded ones each their own)."""
    n, vocab = 20_000, len(CHI2_LOGITS)
    requests = {f"r{i}": dataclasses.replace(params, seed=i if seeded else None)
                for i in range(n)}
    sampler = make_sampler(vocab, requests)
    torch.manual_seed(6)
    logits = torch.tensor([CHI2_LOGITS]).expand(n, vocab)          # [n, 8]
    sampled = sampler(logits, list(requests), [[]] * n).sampled
    counts = torch.bincount(sampled, minlength=vocab).tolist()
    expected = reference_probs(CHI2_LOGITS, params)
    statistic, dof = chi_square(counts, expected, n)
    assert statistic < CHI2_CRITICAL_P1E3[dof], (counts, expected)
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0)
    if params.top_k or params.top_p < 1 or params.min_p:
        assert any(p == 0 for p in expected), "the case should exclude some tokens"


def test_seeded_stream_chi_square() -> None:
    """One seeded request sampled step after step follows the filtered distribution."""
    steps, vocab = 6000, len(CHI2_LOGITS)
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05, seed=7)
    sampler = make_sampler(vocab, {"a": params})
    logits = torch.tensor([CHI2_LOGITS])                           # [1, 8]
    counts = [0] * vocab
    for step in range(steps):
        counts[sampler(logits, ["a"], [[]], [step]).sampled.item()] += 1
    expected = reference_probs(CHI2_LOGITS, params)
    statistic, dof = chi_square(counts, expected, steps)
    assert statistic < CHI2_CRITICAL_P1E3[dof], (counts, expected)
    assert all(c == 0 for c, p in zip(counts, expected) if p == 0)


def run_steps(sampler: Sampler, logits: list[torch.Tensor], batches: list[list[str]],
              outputs: dict[str, list[int]], rows_of: dict[str, int]) -> None:
    """Run one call per step over `batches[t]`; append each row's sample to its output."""
    for step, req_ids in enumerate(batches):
        rows = torch.stack([logits[step][rows_of[r]] for r in req_ids])  # [len(req_ids), vocab]
        rows = rows.to(sampler.device)
        sampled = sampler(rows, req_ids, [outputs[r] for r in req_ids]).sampled.tolist()
        for req_id, token in zip(req_ids, sampled):
            outputs[req_id].append(token)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_request_is_batch_invariant(device: torch.device) -> None:
    vocab, steps = 64, 30
    step_logits = [torch.randn(6, vocab, generator=torch.Generator().manual_seed(100 + t))
                   for t in range(steps)]                          # each [6, 64]
    rows_of = {"s": 0, "s_twin": 0, "other_seed": 1, "unseeded": 2, "greedy": 3, "hot": 4}
    target = SamplingParams(temperature=1.1, top_p=0.95, seed=1234)
    alone = make_sampler(vocab, {"s": target}, device=device)
    alone_out = {"s": []}
    run_steps(alone, step_logits, [["s"]] * steps, alone_out, rows_of)

    mixed = make_sampler(vocab, {
        "s": target, "s_twin": target, "other_seed": SamplingParams(temperature=1.1, seed=99),
        "unseeded": SamplingParams(temperature=1.1), "greedy": SamplingParams(temperature=0.0),
        "hot": SamplingParams(temperature=2.0, top_k=10)}, device=device)
    order = list(rows_of)
    batches = [order[t % 6:] + order[:t % 6] for t in range(steps)]  # "s" changes row
    mixed_out: dict[str, list[int]] = {r: [] for r in rows_of}
    run_steps(mixed, step_logits, batches, mixed_out, rows_of)

    assert mixed_out["s"] == alone_out["s"]
    assert mixed_out["s_twin"] == alone_out["s"]
    other = make_sampler(vocab, {"s": SamplingParams(temperature=1.1, top_p=0.95, seed=4321)},
                         device=device)
    other_out = {"s": []}
    run_steps(other, step_logits, [["s"]] * steps, other_out, rows_of)
    assert other_out["s"] != alone_out["s"]


def test_seeded_token_is_keyed_by_seed_and_output_index() -> None:
    """Output token i of a seeded request is argmax(probs / q), q drawn from
    Generator(draw_seed(seed, i)): whatever row it takes, however many steps came before."""
    vocab, seed = 20, 77
    params = SamplingParams(temperature=0.9, top_k=8, seed=seed)
    sampler = make_sampler(vocab, {"a": params, "b": SamplingParams(temperature=1.0)})
    history: list[int] = []
    for step in range(25):
        logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(step))
        if step == 10:   # re-added after a preemption: nothing changes
            sampler.add_request("a", params, [0], ())
        a_row = step % 2                                           # "a" alternates rows
        req_ids = ["b", "a"] if a_row else ["a", "b"]
        got = sampler(logits, req_ids, [[], history] if a_row else [history, []]
                      ).sampled[a_row].item()
        probs = torch.tensor(reference_probs(logits[a_row].tolist(), params))
        q = torch.empty(vocab).exponential_(
            generator=torch.Generator().manual_seed(draw_seed(seed, step))).double()
        assert got == int((probs / q).argmax()), step
        history.append(got)


def test_rows_of_one_request_sample_as_their_positions_would() -> None:
    """A request's several rows in one call (speculative decoding's draft positions) give the
    tokens that one row per step would, penalties and min_tokens included."""
    vocab, steps = 30, 8
    params = SamplingParams(temperature=0.8, seed=5, repetition_penalty=1.3, min_tokens=3,
                            stop_token_ids=[2])
    logits = torch.randn(steps, vocab, generator=torch.Generator().manual_seed(3)) * 2
    one = make_sampler(vocab, {"a": params}, {"a": [1, 4]})
    history: list[int] = []
    for t in range(steps):
        history.append(one(logits[t:t + 1], ["a"], [list(history)]).sampled.item())
    many = make_sampler(vocab, {"a": params}, {"a": [1, 4]})
    got = many(logits, ["a"] * steps, [history[:t] for t in range(steps)]).sampled.tolist()
    assert got == history
    assert 2 not in history[:3]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_rows_behave_as_alone(device: torch.device) -> None:
    vocab, steps = 48, 20
    step_logits = [torch.randn(5, vocab, generator=torch.Generator().manual_seed(200 + t)) * 3
                   for t in range(steps)]                          # each [5, 48]
    requests = {
        "greedy": SamplingParams(temperature=0.0),
        "greedy_pen": SamplingParams(temperature=0.0, repetition_penalty=1.4,
                                     frequency_penalty=0.5),
        "topk": SamplingParams(temperature=0.7, top_k=4, seed=1, presence_penalty=1.0),
        "topp_minp": SamplingParams(temperature=1.3, top_p=0.7, min_p=0.1, seed=2,
                                    min_tokens=5, stop_token_ids=[3]),
        "plain": SamplingParams(temperature=1.0, seed=3, logprobs=2),
    }
    rows_of = {r: i for i, r in enumerate(requests)}
    prompts = {r: [1, 2, 3] for r in requests}
    alone_out: dict[str, list[int]] = {}
    for req_id, params in requests.items():
        sampler = make_sampler(vocab, {req_id: params}, prompts, (0,), device)
        alone_out[req_id] = []
        run_steps(sampler, step_logits, [[req_id]] * steps, alone_out, rows_of)
    mixed = make_sampler(vocab, requests, prompts, (0,), device)
    order = list(requests)
    rng = random.Random(8)
    batches = [rng.sample(order, len(order)) for _ in range(steps)]
    mixed_out: dict[str, list[int]] = {r: [] for r in requests}
    run_steps(mixed, step_logits, batches, mixed_out, rows_of)
    assert mixed_out == alone_out
    assert all(t not in (0, 3) for t in alone_out["topp_minp"][:5])


def check_logprobs(raw: torch.Tensor, chosen: torch.Tensor, tensors: LogprobsTensors,
                   ks: list[int]) -> None:
    """Compare LogprobsTensors with log_softmax / topk / a counted rank, row by row."""
    expected_lp = torch.log_softmax(raw, dim=-1)                   # [rows, vocab]
    for row, k in enumerate(ks):
        entry = tensors.to_list(row, k)
        token = int(chosen[row])
        values = expected_lp[row].tolist()
        assert len(entry.token_ids) == len(entry.logprobs) == 1 + k
        assert entry.token_ids[0] == token
        assert entry.logprobs[0] == pytest.approx(values[token], abs=1e-6)
        assert entry.rank == 1 + sum(v > values[token] for v in values)
        top = torch.topk(expected_lp[row], k) if k else None
        if top is not None:
            assert entry.token_ids[1:] == top.indices.tolist()
            assert entry.logprobs[1:] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_logprobs_are_raw_with_topk_and_rank() -> None:
    vocab = 25
    raw = torch.randn(5, vocab, generator=torch.Generator().manual_seed(9)) * 2  # [5, 25]
    top1 = raw[1].argmax().item()
    requests = {
        "hot": SamplingParams(temperature=3.0, logprobs=5, seed=10),
        "pen": SamplingParams(temperature=0.0, logprobs=3, presence_penalty=2.0,
                              repetition_penalty=2.0),
        "none": SamplingParams(temperature=1.0, seed=11),
        "zero": SamplingParams(temperature=0.0, logprobs=0),
        "twenty": SamplingParams(temperature=0.5, logprobs=20, seed=12),
    }
    sampler = make_sampler(vocab, requests, {"pen": [top1]})
    outputs = [[], [top1], [], [], []]
    ranks_seen = []
    for _ in range(10):
        out = sampler(raw, list(requests), outputs)
        assert out.logprobs is not None and out.logprobs.token_ids.shape == (5, 21)
        check_logprobs(raw, out.sampled, out.logprobs, [5, 3, 0, 0, 20])
        ranks_seen += out.logprobs.ranks.tolist()
    assert out.logprobs.to_list(1, 0).rank > 1                     # penalised greedy != raw top
    assert out.logprobs.to_list(3, 0).rank == 1                    # greedy on raw logits
    assert max(ranks_seen) > 2
    with pytest.raises(ValueError, match="k must be between 0 and 20"):
        out.logprobs.to_list(0, 21)


def test_no_logprobs_when_no_row_asks() -> None:
    sampler = make_sampler(10, {"a": SamplingParams(temperature=0.0)})
    assert sampler(torch.randn(1, 10), ["a"], [[]]).logprobs is None


@pytest.mark.parametrize("k", [0, 4])
def test_compute_prompt_logprobs(k: int) -> None:
    logits = torch.randn(12, 30, generator=torch.Generator().manual_seed(13))  # [12, 30]
    targets = torch.randint(0, 30, (12,), generator=torch.Generator().manual_seed(14))
    targets[0] = logits[0].argmax()
    result = compute_prompt_logprobs(logits, targets, k)
    assert result.token_ids.shape == (12, 1 + k)
    check_logprobs(logits, targets, result, [k] * 12)
    assert result.ranks[0].item() == 1 and result.ranks.max().item() > 1


def test_rank_counts_only_strictly_more_likely_tokens() -> None:
    logits = torch.tensor([[2.0, 2.0, 1.0], [2.0, 2.0, 1.0], [2.0, 2.0, 1.0]])  # [3, 3]
    result = compute_prompt_logprobs(logits, torch.tensor([0, 1, 2]), 1)
    assert result.ranks.tolist() == [1, 1, 3]


def test_cache_refreshes_when_a_request_is_re_added() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])                       # [1, 3]
    sampler = make_sampler(3, {"a": SamplingParams(temperature=0.0)})
    assert sampler(logits, ["a"], [[1]]).sampled.item() == 1
    sampler.add_request("a", SamplingParams(temperature=0.0, presence_penalty=2.0), [0], ())
    assert sampler(logits, ["a"], [[1]]).sampled.item() == 2
    sampler.remove_request("a")
    with pytest.raises(KeyError, match="not added"):
        sampler(logits, ["a"], [[1]])


def test_bad_inputs_are_rejected_with_clear_errors() -> None:
    sampler = make_sampler(5, {"a": SamplingParams()})
    with pytest.raises(ValueError, match=r"logits must be \[num_rows, 5\]"):
        sampler(torch.zeros(1, 6), ["a"], [[]])
    with pytest.raises(ValueError, match="1 rows but 2 req_ids"):
        sampler(torch.zeros(1, 5), ["a", "a"], [[], []])
    with pytest.raises(ValueError, match=r"stop_ids_for_min_tokens must be in \[0, 5\)"):
        sampler.add_request("b", SamplingParams(), [0], (7,))
