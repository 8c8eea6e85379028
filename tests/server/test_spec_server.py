"""A real server with speculative decoding (`--speculative-config`'s engine): streamed and
whole chat completions are what the engine without drafts gives, several tokens may come in
one chunk, and /metrics counts the drafts (and those kept at each position)."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from taskloom import LLM
from taskloom.sampling_params import SamplingParams
from taskloom.server.launch import ServerThread
from tests.server.conftest import MODEL, start_server, wait_idle

TEXT = ("Prompt lookup decoding bets that the next tokens repeat earlier ones: a summary "
        "quotes its source and an edit copies most of the code it changes.")
MESSAGES = [{"role": "user", "content": f"Repeat this sentence exactly.\n\n{TEXT}"}]


@pytest.fixture(scope="module")
def spec_server_llm() -> LLM:
    return LLM(max_num_seqs=8, kv_cache_memory_gb=0.25,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4})


@pytest.fixture(scope="module")
def spec_server(spec_server_llm: LLM) -> Iterator[ServerThread]:
    st = start_server(spec_server_llm)
    yield st
    st.stop()


def spec_counters(server: ServerThread) -> dict[str, float]:
    values = {}
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith("taskloom_spec_decode_"):
            name, value = line.rsplit(" ", 1)
            values[name.removesuffix("_total").removeprefix("taskloom_spec_decode_")] = \
                float(value)
    return values


def test_streamed_and_whole_completions_match_the_engine_without_drafts(
        spec_server: ServerThread, spec_server_llm: LLM, oracle: LLM) -> None:
    client = openai.OpenAI(base_url=spec_server.base_url + "/v1", api_key="unused",
                           max_retries=0, timeout=120)
    want = oracle.chat(MESSAGES, SamplingParams(max_tokens=48, temperature=0),
                       use_tqdm=False)[0].outputs[0]
    before = spec_counters(spec_server)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=48,
                                           temperature=0)
    assert whole.choices[0].message.content == want.text
    assert whole.usage.completion_tokens == len(want.token_ids)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == want.text
    assert len([d for d in deltas if d]) < len(want.token_ids)   # several tokens a chunk
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    after = spec_counters(spec_server)
    assert after["num_drafts"] > before["num_drafts"]
    accepted = after["num_accepted_tokens"] - before["num_accepted_tokens"]
    assert 0 < accepted <= after["num_draft_tokens"] - before["num_draft_tokens"]
    per_pos = [after[k] for k in sorted(after) if k.startswith("num_accepted_tokens_per_pos")]
    assert per_pos and sum(per_pos) == after["num_accepted_tokens"]
    assert per_pos == sorted(per_pos, reverse=True)   # a later draft needs the ones before
    wait_idle(spec_server_llm)
    assert spec_server_llm.engine.scheduler.proposer.num_requests == 0


def test_streamed_logprobs_with_drafts(spec_server: ServerThread, spec_server_llm: LLM,
                                       oracle: LLM) -> None:
    """A chunk of several tokens carries a logprob entry for each, as without drafts."""
    client = openai.OpenAI(base_url=spec_server.base_url + "/v1", api_key="unused",
                           max_retries=0, timeout=120)
    want = oracle.chat(MESSAGES, SamplingParams(max_tokens=32, temperature=0, logprobs=2),
                       use_tqdm=False)[0].outputs[0]
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=32, temperature=0, stream=True,
        logprobs=True, top_logprobs=2))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    assert len(entries) == len(want.token_ids)
    for got, pos in zip(entries, want.logprobs):
        assert got.logprob == pytest.approx(max(v.logprob for v in pos.values()), abs=1e-4)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx(
            sorted((v.logprob for v in pos.values()), reverse=True)[:2], abs=1e-4)
    wait_idle(spec_server_llm)
