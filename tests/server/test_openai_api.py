"""The official `openai` client against a real server: completions and chat, streaming and
not, n > 1, stop strings, logprobs, seeds, usage; outputs equal LLM.generate / LLM.chat."""
from __future__ import annotations

import json

import httpx
import openai

from taskloom import LLM, SamplingParams
from tests.server.conftest import MODEL

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
CHAT = [{"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Name three colours."}]


def test_models_and_health(client: openai.OpenAI, server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}


def test_completion_equals_generate(client: openai.OpenAI, oracle: LLM) -> None:
    expected = oracle.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24),
                               use_tqdm=False)
    r = client.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=24, temperature=0)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.created > 0
    assert [c.index for c in r.choices] == [0, 1, 2]
    for choice, exp in zip(r.choices, expected):
        assert choice.text == exp.outputs[0].text
        assert choice.finish_reason == exp.outputs[0].finish_reason
    assert r.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert r.usage.completion_tokens == sum(len(e.outputs[0].token_ids) for e in expected)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_token_id_prompts(client: openai.OpenAI, oracle: LLM) -> None:
    ids = oracle.tokenizer.encode(PROMPTS[0])
    exp = oracle.generate([ids], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    one = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    many = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=8,
                                     temperature=0)
    assert one.choices[0].text == exp[0].outputs[0].text
    assert [c.text for c in many.choices] == [exp[0].outputs[0].text] * 2


def test_streamed_completion_equals_whole(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=32,
                                      temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=32,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_equals_llm_chat(client: openai.OpenAI, oracle: LLM) -> None:
    exp = oracle.chat(CHAT, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40,
                                       temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == exp.outputs[0].text
    assert r.choices[0].finish_reason == exp.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(exp.prompt_token_ids)
    assert r.usage.completion_tokens == len(exp.outputs[0].token_ids)


def test_chat_text_parts_and_max_completion_tokens(client: openai.OpenAI) -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three "},
                                          {"type": "text", "text": "colours."}]}]
    a = client.chat.completions.create(model=MODEL, messages=parts, max_completion_tokens=6,
                                       temperature=0)
    b = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name three colours."}],
        max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 6 and a.choices[0].finish_reason == "length"


def test_streamed_chat_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=40, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_stream_ends_with_done(server) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=body,
                      timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])


def test_n2_and_seed_reproducible(client: openai.OpenAI, oracle: LLM) -> None:
    kwargs = dict(model=MODEL, prompt=PROMPTS[2], max_tokens=16, temperature=1.0, n=2, seed=7)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text
    exp = oracle.generate(PROMPTS[2], SamplingParams(n=2, temperature=1.0, max_tokens=16,
                                                     seed=7), use_tqdm=False)[0]
    assert [c.text for c in a.choices] == [o.text for o in exp.outputs]
    chat = dict(model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0, n=2, seed=3)
    c1, c2 = (client.chat.completions.create(**chat) for _ in range(2))
    assert [c.message.content for c in c1.choices] == [c.message.content for c in c2.choices]
    assert c1.usage.completion_tokens == sum(len(o.token_ids) for o in oracle.chat(
        CHAT, SamplingParams(n=2, temperature=1.0, max_tokens=12, seed=3),
        use_tqdm=False)[0].outputs)


def test_streamed_samples_that_finish_apart_each_finish_once(client: openai.OpenAI) -> None:
    """n=3 samples that stop after 3, 2 and 24 tokens (seed 14): streamed, each sample's
    finish_reason comes once, in its last chunk, and its text and logprobs equal the whole
    response's; usage counts every sample's tokens."""
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Say yes or no."}],
                  max_tokens=24, temperature=1.0, n=3, seed=14, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kwargs)
    assert [c.finish_reason for c in whole.choices] == ["stop", "stop", "length"]
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage == whole.usage
    for want in whole.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == want.index]
        assert [c.finish_reason for c in mine] == [None] * (len(mine) - 1) + [
            want.finish_reason]
        assert "".join(c.delta.content or "" for c in mine) == want.message.content
        assert [lp.token for c in mine if c.logprobs for lp in c.logprobs.content] == [
            lp.token for lp in want.logprobs.content]
    finished = client.completions.create(model=MODEL, prompt=PROMPTS[2], max_tokens=24,
                                         temperature=1.0, n=3, seed=0, stream=True)
    reasons = [(c.choices[0].index, c.choices[0].finish_reason) for c in finished
               if c.choices and c.choices[0].finish_reason]
    assert sorted(i for i, _ in reasons) == [0, 1, 2]


def test_return_token_ids(client: openai.OpenAI, oracle: LLM) -> None:
    """The `return_token_ids` extension (vLLM's): the prompt's and each choice's token ids,
    whole or chunk by chunk."""
    extra = {"return_token_ids": True}
    want = oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=8),
                           use_tqdm=False)[0]
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                  extra_body=extra)
    choice = r.choices[0].model_dump()
    assert choice["token_ids"] == want.outputs[0].token_ids
    assert choice["prompt_token_ids"] == want.prompt_token_ids
    chunks = [c.choices[0].model_dump() for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
        extra_body=extra) if c.choices]
    assert [i for c in chunks for i in c["token_ids"]] == want.outputs[0].token_ids
    assert chunks[0]["prompt_token_ids"] == want.prompt_token_ids
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    plain = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=2)
    assert "token_ids" not in plain.choices[0].model_dump()
    chat_want = oracle.chat(CHAT, SamplingParams(temperature=0, max_tokens=8),
                            use_tqdm=False)[0]
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                          temperature=0, extra_body=extra).model_dump()
    assert chat["prompt_token_ids"] == chat_want.prompt_token_ids
    assert chat["choices"][0]["token_ids"] == chat_want.outputs[0].token_ids
    streamed = [c.model_dump() for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
        extra_body=extra)]
    assert streamed[0]["prompt_token_ids"] == chat_want.prompt_token_ids
    assert [i for c in streamed[1:] for i in c["choices"][0]["token_ids"]] == \
        chat_want.outputs[0].token_ids


def test_stop_strings(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=40,
                                     temperature=0).choices[0].text
    stop = free.strip()[4:7]
    assert stop and stop in free
    r = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=40,
                                  temperature=0, stop=[stop, "@@@"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[:free.index(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=40, temperature=0, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_completion_logprobs_and_echo(client: openai.OpenAI, oracle: LLM) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and token in top and 3 <= len(top) <= 4
        assert value == max(top.values())  # greedy picks the most likely token
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    e = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6,
                                  temperature=0, logprobs=1, echo=True)
    n_prompt = len(oracle.tokenizer.encode(PROMPTS[0]))
    elp = e.choices[0].logprobs
    assert e.choices[0].text == PROMPTS[0] + r.choices[0].text
    assert len(elp.tokens) == n_prompt + 6 and elp.token_logprobs[0] is None
    assert all(v is not None for v in elp.token_logprobs[1:])
    assert elp.tokens[n_prompt:] == lp.tokens


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen is the top one
        assert item.bytes == list(item.token.encode())
    streamed = [lp for c in client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, stream=True) if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.content]
    assert [s.token for s in streamed] == [c.token for c in content]


def test_user_field_and_extensions_accepted(client: openai.OpenAI, oracle: LLM) -> None:
    params = SamplingParams(temperature=0.8, top_k=5, min_p=0.05, repetition_penalty=1.2,
                            min_tokens=10, ignore_eos=True, max_tokens=12, seed=11)
    exp = oracle.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0]
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0.8, seed=11, user="u-1",
        extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 10,
                    "ignore_eos": True})
    assert r.choices[0].text == exp.text and r.usage.completion_tokens == 12


def test_prefix_cache_counters_in_metrics(client: openai.OpenAI, server) -> None:
    def counters() -> tuple[float, float]:
        values = {}
        for line in httpx.get(server.base_url + "/metrics").text.splitlines():
            if line.startswith("taskloom_prefix_cache_"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return (values["taskloom_prefix_cache_queries_total"],
                values["taskloom_prefix_cache_hits_total"])

    q0, h0 = counters()
    system = {"role": "system", "content": "You answer in French, politely. " * 8}
    for question in ("Hello?", "Goodbye?"):
        client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0,
                                       messages=[system, {"role": "user", "content": question}])
    q1, h1 = counters()
    assert q1 - q0 > 100 and h1 - h0 >= 64   # the second request found the system prompt


def test_token_metrics_count_a_streamed_request(client: openai.OpenAI, server) -> None:
    """Generated tokens and the latency histograms move by what one streamed request of 12
    tokens makes: 12 tokens, one first-token time, 11 gaps (or fewer, if the server sent
    some steps' tokens in one chunk), one end-to-end latency."""
    from prometheus_client.parser import text_string_to_metric_families

    def samples() -> dict[str, float]:
        text = httpx.get(server.base_url + "/metrics").text
        return {f"{s.name}{'' if 'le' not in s.labels else '@' + s.labels['le']}": s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    before = samples()
    chunks = list(client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    after = samples()
    delta = {k: after[k] - before.get(k, 0.0) for k in after}
    assert delta["taskloom_generation_tokens_total"] == 12
    assert delta["taskloom_time_to_first_token_seconds_count"] == 1
    assert delta["taskloom_e2e_request_latency_seconds_count"] == 1
    gaps = delta["taskloom_inter_token_latency_seconds_count"]
    assert 1 <= gaps <= 11 and delta["taskloom_inter_token_latency_seconds_sum"] > 0
    assert delta["taskloom_inter_token_latency_seconds_bucket@+Inf"] == gaps
    buckets = [v for k, v in sorted(after.items()) if
               k.startswith("taskloom_inter_token_latency_seconds_bucket@")]
    assert max(buckets) == after["taskloom_inter_token_latency_seconds_count"]
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 1
