"""Token trees through the model runner, on a tiny random-weight Llama: a tree step whose
kept path runs off the chain of best guesses (the second guess at depth 1, then the second
under it) keeps exactly the drafts greedy decoding produces, samples the token after them,
leaves the KV of the kept path in the slots of its positions (as a plain prefill of those
tokens writes them), and the next step's decode goes on from there as greedy does."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from taskloom import LLM
from taskloom.engine.draft_tree import TokenTree
from taskloom.engine.outputs import NewRequestData, ScheduledSeq, SchedulerOutput
from taskloom.runtime.model_runner import ModelRunner
from taskloom.sampling_params import SamplingParams
from tests.e2e.conftest import assert_pool_full
from tests.models.tiny_models import TINY_LLAMA_CONFIG, write_tiny_config

BLOCK = 4
PROMPT = [5, 17, 99, 3, 250, 41, 7, 600, 12]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
# nodes: (0,) (1,) (1, 0) (1, 1) (1, 1, 0); the greedy tokens sit at (1,), (1, 1), (1, 1, 0)
TREE = TokenTree(((0,), (1,), (1, 0), (1, 1), (1, 1, 0)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    llm = LLM(write_tiny_config(tmp_path_factory.mktemp("tiny")), random_weights=True,
              num_blocks=32, block_size=BLOCK)
    yield llm
    assert_pool_full(llm)


def runner(llm: LLM, split: bool = False) -> ModelRunner:
    """A runner of the tiny model; `split`: drafted sequences attend as one decode a token,
    as on a GPU with CUDA graphs (tree nodes by their bits)."""
    model = llm.engine.runner.model
    r = ModelRunner(model, model.config, 16, BLOCK, torch.float32, torch.device("cpu"), (), 64)
    r.split_drafted = split
    return r


def step(r: ModelRunner, tokens: list[int], computed: int, out_ids: list[int],
         new: bool = False, drafts: list[int] | None = None,
         parents: tuple[int, ...] = ()):
    seq = ScheduledSeq("a", tokens, computed, list(range(8)), True, out_ids, len(PROMPT),
                       drafts or (), parents)
    sched = SchedulerOutput([NewRequestData("a", PROMPT, GREEDY)] if new else [], [seq], [],
                            len(tokens))
    return r.submit(sched).result()


def kv_at(r: ModelRunner, positions: range) -> list[torch.Tensor]:
    slots = torch.tensor(list(positions))       # blocks 0.. in order: slot = position
    return [cache.view(2, -1, *cache.shape[3:])[:, slots] for cache in r.kv_caches]


@pytest.mark.parametrize("split", [False, True], ids=["tree-mask", "decodes"])
def test_a_path_off_the_chain_is_kept_and_its_kv_moved_into_place(tiny: LLM,
                                                                   split: bool) -> None:
    (out,) = tiny.generate([PROMPT], GREEDY, use_tqdm=False)
    g = out.outputs[0].token_ids                        # what greedy decoding produces
    vocab = TINY_LLAMA_CONFIG["vocab_size"]
    wrong = [(t + 1) % vocab for t in g]
    r = runner(tiny, split)
    n = len(PROMPT)
    assert step(r, PROMPT, 0, [], new=True).sampled == {"a": g[0]}
    drafts = [wrong[1], g[1], wrong[2], g[2], g[3]]
    res = step(r, [g[0], *drafts], n, [g[0]], drafts=drafts, parents=TREE.parents)
    assert res.accepted_paths == {"a": [1, 3, 4]} and res.num_accepted == {"a": 3}
    assert res.sampled == {"a": g[4]}
    # the KV of positions n .. n + 3 is that of g0 .. g3, as a prefill of them leaves it
    ref = runner(tiny)
    step(ref, PROMPT + g[:4], 0, [], new=True)
    for got, want in zip(kv_at(r, range(n + 4)), kv_at(ref, range(n + 4))):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and the next decode goes on as greedy decoding does
    assert step(r, [g[4]], n + 4, g[:5]).sampled == {"a": g[5]}


def test_a_tree_none_of_whose_drafts_hold_keeps_the_sampled_token(tiny: LLM) -> None:
    (out,) = tiny.generate([PROMPT], GREEDY, use_tqdm=False)
    g = out.outputs[0].token_ids
    vocab = TINY_LLAMA_CONFIG["vocab_size"]
    r = runner(tiny)
    step(r, PROMPT, 0, [], new=True)
    drafts = [(g[1] + i) % vocab for i in (1, 2, 3, 4, 5)]
    res = step(r, [g[0], *drafts], len(PROMPT), [g[0]], drafts=drafts, parents=TREE.parents)
    assert res.accepted_paths == {"a": []} and res.sampled == {"a": g[1]}
    assert step(r, [g[1]], len(PROMPT) + 1, g[:2]).sampled == {"a": g[2]}
