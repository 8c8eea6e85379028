"""Automatic prefix caching on the tiny chat model (the embedded model's tokenizer, random
weights): cached and uncached engines give the same greedy (and seeded) outputs across chunk
boundaries, preemption, eviction and n > 1, while the cached one computes shared prefixes
once; every block is back in the pool after each test."""
from __future__ import annotations

import pytest

from taskloom import LLM, SamplingParams
from tests.e2e.conftest import assert_pool_full

SYSTEM = ("You are a careful assistant for a logistics company. Answer in one short sentence, "
          "name the warehouse when you know it, and never invent tracking numbers. ") * 3
QUESTIONS = ["Where is parcel A?", "When does the truck leave?", "Who signs for returns?",
             "Is Sunday delivery possible?", "How heavy can a box be?", "Can I change the "
             "address?", "What is the fee for express?", "Do you ship abroad?"]
GREEDY = SamplingParams(temperature=0, max_tokens=16)


def conversations() -> list[list[dict]]:
    return [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            for q in QUESTIONS]


@pytest.fixture(scope="module")
def uncached(tiny_model: str) -> LLM:
    return LLM(tiny_model, max_num_seqs=16, kv_cache_memory_gb=0.25,
               enable_prefix_caching=False)


@pytest.fixture(scope="module")
def expected(uncached: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in uncached.chat(conversations(), GREEDY,
                                                         use_tqdm=False)]


def _hits(llm: LLM) -> int:
    return llm.engine.scheduler.kv.stats.hits


def test_shared_system_prompt_computed_once(tiny_llm: LLM, expected: list[list[int]]) -> None:
    before = _hits(tiny_llm)
    got = [o.outputs[0].token_ids
           for o in tiny_llm.chat(conversations(), GREEDY, use_tqdm=False)]
    assert got == expected
    prompt_len = len(tiny_llm.encode_chat(conversations()[0]))
    shared_blocks = len(tiny_llm.encode_chat([{"role": "system", "content": SYSTEM}])) // 16
    # the first request computes the prefix; the other seven find it (same step or later)
    assert _hits(tiny_llm) - before >= 7 * (shared_blocks - 1) * 16
    assert prompt_len > shared_blocks * 16
    again = [o.outputs[0].token_ids
             for o in tiny_llm.chat(conversations(), GREEDY, use_tqdm=False)]
    assert again == expected


@pytest.fixture(scope="module")
def chunked_llm(tiny_model: str) -> LLM:
    return LLM(tiny_model, max_num_seqs=16, max_num_batched_tokens=37,
               kv_cache_memory_gb=0.25)


def test_cached_across_chunk_boundaries(chunked_llm: LLM, expected: list[list[int]]) -> None:
    got = [o.outputs[0].token_ids for o in chunked_llm.chat(conversations(), GREEDY,
                                                            use_tqdm=False)]
    assert got == expected and _hits(chunked_llm) > 0


@pytest.fixture(scope="module")
def tiny_pool_llm(tiny_model: str) -> LLM:
    """Room for about two of these conversations besides their shared prefix: preemption and
    eviction both happen."""
    return LLM(tiny_model, max_num_seqs=16, num_blocks=14)


def test_cached_under_preemption_and_eviction(tiny_pool_llm: LLM,
                                              expected: list[list[int]]) -> None:
    got = [o.outputs[0].token_ids for o in tiny_pool_llm.chat(conversations(), GREEDY,
                                                              use_tqdm=False)]
    assert got == expected
    sched = tiny_pool_llm.engine.scheduler
    assert sched.num_preemptions > 0 and _hits(tiny_pool_llm) > 0
    other = [[{"role": "user", "content": f"Count to {i}."}] for i in range(12)]
    tiny_pool_llm.chat(other, SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert_pool_full(tiny_pool_llm)       # every ref count back to zero, blocks evicted
    again = [o.outputs[0].token_ids for o in tiny_pool_llm.chat(conversations(), GREEDY,
                                                                use_tqdm=False)]
    assert again == expected


def test_n_samples_share_the_prompt(tiny_llm: LLM, uncached: LLM) -> None:
    conv = conversations()[0]
    params = SamplingParams(n=4, temperature=0.9, seed=5, max_tokens=16)
    before = _hits(tiny_llm)
    got = tiny_llm.chat(conv, params, use_tqdm=False)[0]
    ref = uncached.chat(conv, params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in ref.outputs]
    prompt_blocks = (len(got.prompt_token_ids) - 1) // 16
    assert _hits(tiny_llm) - before >= 3 * prompt_blocks * 16   # siblings 2..4 reuse #1's


def test_second_turn_reuses_the_first(tiny_llm: LLM, uncached: LLM) -> None:
    conv = conversations()[1]
    first = tiny_llm.chat(conv, GREEDY, use_tqdm=False)[0].outputs[0].text
    turn2 = conv + [{"role": "assistant", "content": first},
                    {"role": "user", "content": "And on Monday?"}]
    before = _hits(tiny_llm)
    got = tiny_llm.chat(turn2, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert got == uncached.chat(turn2, GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert _hits(tiny_llm) - before >= (len(tiny_llm.encode_chat(conv)) // 16 - 1) * 16


@pytest.fixture(scope="module")
def narrow_llm(tiny_model: str) -> LLM:
    """Two sequences at a time over a pool that holds two prefixes and little else."""
    return LLM(tiny_model, max_num_seqs=2, num_blocks=11)


def _interleaved(seed: int) -> list[list[int]]:
    from taskloom.bench.throughput import make_prompts
    return make_prompts(12, 8, None, 40000, seed, shared_prefix=64, num_prefixes=3)


def test_prefix_aware_order_beats_input_order(narrow_llm: LLM, uncached: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    hits = {}
    for aware, seed in ((False, 1), (True, 2)):    # new prefixes each run: no carry-over
        prompts = _interleaved(seed)
        narrow_llm.prefix_aware_order = aware
        before = _hits(narrow_llm)
        got = narrow_llm.generate(prompts, params, use_tqdm=False)
        hits[aware] = _hits(narrow_llm) - before
        ref = uncached.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
        assert [o.prompt_token_ids for o in got] == prompts        # input order kept
    # grouped: 3 of each 4 requests reuse their group's 4 prefix blocks
    assert hits[True] >= 9 * 64 and hits[True] > hits[False]
    narrow_llm.prefix_aware_order = True


def test_shared_prefix_attention_is_taken_and_can_be_turned_off(
        tiny_llm: LLM, tiny_model: str, expected: list[list[int]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The decodes sharing the cached system prompt attend to it together (one call of the
    grouped path per layer and step), unless the engine turns that off; the outputs are the
    uncached engine's either way."""
    import taskloom.ops.attention as ref
    grouped = []
    real = ref._decode_shared_prefix
    monkeypatch.setattr(ref, "_decode_shared_prefix",
                        lambda q, cache, group, *a: grouped.append(len(group.rows)) or
                        real(q, cache, group, *a))
    alone = LLM(tiny_model, max_num_seqs=16, kv_cache_memory_gb=0.25,
                shared_prefix_attention=False)
    for engine, want_grouped in ((tiny_llm, True), (alone, False)):
        grouped.clear()
        outs = engine.chat(conversations(), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected
        assert bool(grouped) == want_grouped
        if want_grouped:
            assert max(grouped) == len(QUESTIONS)
        assert_pool_full(engine)
