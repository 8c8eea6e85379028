"""Token trees for speculative decoding on the host: the tree's node order and parents, the
config's checks, the path a step keeps, and a scheduler that drafts trees: cut to its room
and max_tokens, chains for structured outputs, the accounting of a kept path. No torch."""
from __future__ import annotations

import pytest

from taskloom.config import (CacheConfig, EngineConfig, SchedulerConfig, SnapKVConfig,
                             SpeculativeConfig)
from taskloom.engine.draft_tree import (TokenTree, accepted_path, best_tree, depths, expected_kept,
                                        is_chain, parse_tree)
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.model_drafts import ModelDraftProposer
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request, RequestStatus
from taskloom.engine.scheduler import Scheduler
from taskloom.sampling_params import SamplingParams

# depth 1: ranks 0, 1, 2; depth 2: (0, 0), (0, 1), (1, 0); depth 3: (0, 0, 0)
PATHS = [(0,), (0, 0), (1,), (0, 1), (2,), (1, 0), (0, 0, 0)]
TREE = SpeculativeConfig(method="medusa", model="/heads", num_speculative_tokens=3,
                         speculative_token_tree=PATHS)


def test_nodes_are_ordered_by_depth_then_ranks_with_parents_first() -> None:
    tree = TokenTree(tuple(PATHS))
    assert tree.paths == ((0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert tree.parents == (0, 0, 0, 1, 1, 2, 4)
    assert depths(tree.parents) == (0, 1, 1, 1, 2, 2, 2, 3)
    assert tree.top_chain == [0, 3, 6] and tree.depth == 3 and tree.num_nodes == 7
    assert [tree.max_rank(d) for d in (1, 2, 3)] == [2, 1, 0]
    assert tree.num_within(5, 3) == 5 and tree.num_within(7, 1) == 3
    assert tree.num_within(7, 2) == 6 and tree.num_within(0, 3) == 0
    assert is_chain((0, 1, 2)) and not is_chain(tree.parents)


def test_the_config_reads_vllm_text_and_refuses_bad_trees() -> None:
    cfg = SpeculativeConfig(method="hydra", model="/h", num_speculative_tokens=2,
                            speculative_token_tree="[(0,), (1,), (0, 0)]")
    assert cfg.speculative_token_tree == ((0,), (1,), (0, 0))
    assert cfg.token_tree is not None and cfg.token_tree.parents == (0, 0, 1)
    bad = {"[(0, 0)]": r"no parent \[0\]", "[(0,), (0,)]": "twice", "x": "not a list",
           "[]": "non-empty", "[(0,), (-1,)]": "ranks >= 0", "[(0,), (0, 0), (0, 0, 0)]":
           "3 deep, but num_speculative_tokens is 2"}
    for tree, match in bad.items():
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig(method="medusa", model="/h", num_speculative_tokens=2,
                              speculative_token_tree=tree)
    with pytest.raises(ValueError, match="needs draft heads"):
        SpeculativeConfig(num_speculative_tokens=1, speculative_token_tree=[[0]])
    with pytest.raises(ValueError, match="does not run with a sliding window"):
        EngineConfig(cache=CacheConfig(sliding_window=64), speculative=TREE)
    with pytest.raises(ValueError, match="snapkv"):
        EngineConfig(cache=CacheConfig(snapkv=SnapKVConfig(budget=64, window_size=8)),
                     speculative=TREE)
    assert parse_tree([[0], [1]]) == ((0,), (1,))


def test_the_kept_path_follows_what_the_model_sampled() -> None:
    tree = TokenTree(tuple(PATHS))
    drafts = [10, 11, 12, 20, 21, 30, 40]   # node i + 1 holds drafts[i]
    # root sampled 11 -> node 2 (draft 1); it sampled 30 -> node 6 (draft 5); then 99: stop
    sampled = [11, 0, 30, 0, 0, 0, 99, 0]
    assert accepted_path(tree.parents, drafts, sampled) == [1, 5]
    sampled = [10, 21, 0, 0, 0, 40, 0, 0]   # 10 -> draft 0, 21 -> draft 4, 40 -> draft 6
    assert accepted_path(tree.parents, drafts, sampled) == [0, 4]
    assert accepted_path(tree.parents, drafts, [13] + [0] * 7) == []


def scheduler(config: SpeculativeConfig = TREE, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=budget), KVCacheManager(32, 4), 128,
                     proposer=ModelDraftProposer(config))


def request(rid: str, max_tokens: int = 32) -> Request:
    return Request(rid, list(range(1, 7)), SamplingParams(max_tokens=max_tokens),
                   eos_token_ids=(0,))


def test_a_step_drafts_the_tree_and_keeps_the_path_the_runner_names() -> None:
    s = scheduler()
    a = request("a")
    s.add_request(a)
    first = s.schedule()
    guesses = [10, 11, 12, 20, 21, 30, 40]
    s.update(first, RunnerOutput(sampled={"a": 50}, draft_token_ids={"a": guesses}))
    out = s.schedule()
    (seq,) = out.seqs
    assert TREE.token_tree is not None
    assert list(seq.draft_token_ids) == guesses
    assert tuple(seq.draft_parents) == TREE.token_tree.parents
    assert seq.token_ids == [50, *guesses] and out.num_scheduled_tokens == 8
    # the runner kept node 2 (draft 1) and node 6 (draft 5), then sampled 60
    s.update(out, RunnerOutput(sampled={"a": 60}, accepted_paths={"a": [1, 5]},
                               draft_token_ids={"a": guesses}))
    assert a.output_token_ids == [50, 11, 30, 60]
    assert a.num_computed_tokens == 6 + 1 + 2      # the root and the two kept
    stats = s.spec_stats
    assert (stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens) == (1, 7, 2)
    assert stats.num_accepted_tokens_per_pos == [1, 1]
    # a step that keeps one draft counts at the first position only
    out = s.schedule()
    assert out.seqs[0].draft_token_ids
    s.update(out, RunnerOutput(sampled={"a": 61}, accepted_paths={"a": [0]}))
    assert stats.num_accepted_tokens_per_pos == [2, 1] and stats.num_accepted_tokens == 3
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_the_tree_is_cut_to_the_budget_and_max_tokens() -> None:
    guesses = [10, 11, 12, 20, 21, 30, 40]
    for budget, max_tokens, want in ((6, 32, 5), (64, 3, 3)):
        s = scheduler(budget=budget)
        a = request("a", max_tokens=max_tokens)
        s.add_request(a)
        s.update(s.schedule(), RunnerOutput(sampled={"a": 50}, draft_token_ids={"a": guesses}))
        # budget 6: the root and 5 drafts; max_tokens 3 after 1 token: drafts 1 deep
        (seq,) = s.schedule().seqs
        assert list(seq.draft_token_ids) == guesses[:want]
        assert tuple(seq.draft_parents) == (0, 0, 0, 1, 1)[:want]
        s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
        assert s.kv.num_free_blocks == s.kv.num_blocks


def test_a_structured_output_gets_the_chain_of_best_guesses() -> None:
    proposer = ModelDraftProposer(TREE)
    a = request("a")
    proposer.record(a, [10, 11, 12, 20, 21, 30, 40])
    assert proposer.propose(a, 3) == [10, 20, 40] and proposer.propose(a, 2) == [10, 20]
    assert proposer.propose_tree(a, 4, 3) == ([10, 11, 12, 20], (0, 0, 0, 1))
    a.output_token_ids.append(5)        # moved on: nothing stale
    assert proposer.propose_tree(a, 7, 3) == ([], ()) and proposer.propose(a, 3) == []


def test_the_best_tree_adds_the_likeliest_paths() -> None:
    acc = [[0.6, 0.2, 0.05], [0.5, 0.1, 0.02], [0.4, 0.1, 0.01]]
    # 0.6, 0.3 (0, 0), 0.2, 0.12 (0, 0, 0), 0.1 (1, 0), 0.06 (0, 1), 0.05 (2,) ...
    assert best_tree(acc, 1) == ((0,),)
    assert best_tree(acc, 4) == ((0,), (1,), (0, 0), (0, 0, 0))
    six = best_tree(acc, 6)
    assert six == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    assert expected_kept(six, acc) == pytest.approx(0.6 + 0.2 + 0.3 + 0.06 + 0.1 + 0.12)
    # no tree of six does better: swap any node for the next candidate
    assert expected_kept(six, acc) > expected_kept(
        ((0,), (1,), (2,), (0, 0), (1, 0), (0, 0, 0)), acc)
    assert expected_kept(((0,), (0, 0), (0, 0, 0)), acc) == pytest.approx(0.6 + 0.3 + 0.12)
    assert len(best_tree(acc, 100)) == 3 + 9 + 27     # every path there is
    with pytest.raises(ValueError, match="at least 1 node"):
        best_tree(acc, 0)
