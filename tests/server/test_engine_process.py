"""The server with its engine core in a process of its own (`taskloom serve`'s default), driven
by the official `openai` client: the same outputs as LLM.generate, prompts and logprobs
across the pipe, LoRA adapters named, loaded and unloaded in the server's process and served
by the engine's, refusals and disconnects that leave the pool full, a build error raised
where the server starts, and an engine process that dies: its requests fail, /health says
so, and the server stays up."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from taskloom import LLM, SamplingParams
from taskloom.cli import build_parser, engine_cpu_threads, served_engine
from taskloom.engine.core_process import ProcessEngineClient
from taskloom.lora.random_adapter import write_random_adapter
from taskloom.models.loader import random_arch
from taskloom.server.launch import ServerThread, free_port, uvicorn_config
from tests.server.conftest import MODEL
from tests.server.test_errors import assert_error, post

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def start(*argv: str) -> tuple[ServerThread, ProcessEngineClient]:
    """A server on 127.0.0.1 whose engine `taskloom serve ARGV` builds in its own process."""
    a = build_parser().parse_args(["serve", "--kv-cache-memory-gb", "0.25", "--dtype",
                                   "float32", "--max-num-seqs", "16", *argv])  # the oracle's
    client = served_engine(a)
    assert isinstance(client, ProcessEngineClient)
    config = uvicorn_config(client, MODEL, "127.0.0.1", free_port(), None, None,
                            shutdown_grace=5, log_level="warning")
    try:
        return ServerThread(config).start(), client
    except BaseException:
        client.stop()
        raise


def wait_idle(engine: ProcessEngineClient, timeout: float = 30.0) -> None:
    """Wait until the engine's stats say nothing runs or waits and every KV block is free."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats
        if (s.num_running, s.num_waiting, s.kv_cache_usage) == (0, 0, 0.0):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine not idle: {engine.stats}")


@pytest.fixture(scope="module")
def alpha(tmp_path_factory: pytest.TempPathFactory) -> str:
    arch, _ = random_arch("smollm2-135m")
    root = tmp_path_factory.mktemp("adapters")
    return write_random_adapter(str(root / "alpha"), arch, rank=8, seed=1, std=0.05)


@pytest.fixture(scope="module")
def proc_server(alpha: str) -> Iterator[tuple[ServerThread, ProcessEngineClient]]:
    st, engine = start("--lora", f"alpha={alpha}", "--max-loras", "2")
    yield st, engine
    st.stop()
    assert not engine.running, "the engine process outlived the server"


@pytest.fixture
def pclient(proc_server: tuple[ServerThread, ProcessEngineClient]) -> Iterator[openai.OpenAI]:
    st, engine = proc_server
    yield openai.OpenAI(base_url=st.base_url + "/v1", api_key="unused", max_retries=0,
                        timeout=120)
    wait_idle(engine)


def test_outputs_equal_generate(pclient: openai.OpenAI, oracle: LLM,
                                proc_server: tuple[ServerThread, ProcessEngineClient]) -> None:
    _, engine = proc_server
    assert engine.pid != os.getpid() and engine.running
    want = oracle.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=16, logprobs=2),
                           use_tqdm=False)
    r = pclient.completions.create(model=MODEL, prompt=PROMPTS, max_tokens=16, temperature=0,
                                   logprobs=2)
    for choice, w in zip(r.choices, want, strict=True):
        assert choice.text == w.outputs[0].text
        assert choice.logprobs.tokens == [oracle.tokenizer.decode([t]) for t in
                                          w.outputs[0].token_ids]
        got = [max(top.values()) for top in choice.logprobs.top_logprobs]
        assert got == pytest.approx([p[t].logprob for p, t in
                                     zip(w.outputs[0].logprobs, w.outputs[0].token_ids)],
                                    abs=1e-4)
    # the prompts stayed in the server's process: usage counts them all the same
    assert r.usage.prompt_tokens == sum(len(w.prompt_token_ids) for w in want)
    echo = pclient.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4,
                                      temperature=0, echo=True, logprobs=1)
    assert echo.choices[0].text == PROMPTS[0] + want[0].outputs[0].text[:len(
        echo.choices[0].text) - len(PROMPTS[0])]
    sampled = oracle.generate(PROMPTS[1], SamplingParams(n=2, temperature=1.0, seed=7,
                                                         max_tokens=12, stop=["\n\n"]),
                              use_tqdm=False)[0]
    r = pclient.completions.create(model=MODEL, prompt=PROMPTS[1], n=2, temperature=1.0,
                                   seed=7, max_tokens=12, stop=["\n\n"])
    assert [c.text for c in r.choices] == [c.text for c in sampled.outputs]


def test_streamed_chat_equals_llm_chat(pclient: openai.OpenAI, oracle: LLM) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    want = oracle.chat(messages, SamplingParams(temperature=0, max_tokens=24),
                       use_tqdm=False)[0]
    chunks = list(pclient.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        want.outputs[0].text
    assert chunks[-1].usage.prompt_tokens == len(want.prompt_token_ids)
    assert chunks[-1].usage.completion_tokens == len(want.outputs[0].token_ids)


def test_adapters_cross_to_the_engine_process(pclient: openai.OpenAI, alpha: str,
                                              proc_server: tuple[ServerThread,
                                                                 ProcessEngineClient]) -> None:
    st, _ = proc_server
    oracle = LLM(max_num_seqs=4, kv_cache_memory_gb=0.1, loras={"alpha": alpha, "beta": alpha})
    want = oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10),
                           use_tqdm=False, lora="alpha")[0].outputs[0].text
    base = oracle.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=10),
                           use_tqdm=False)[0].outputs[0].text
    assert want != base
    assert {m.id for m in pclient.models.list().data} == {MODEL, "alpha"}
    r = pclient.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=10,
                                   temperature=0)
    assert r.choices[0].text == want
    # loaded at runtime: named in the server's process, loaded by the engine's
    assert post(st, "/v1/load_lora_adapter",
                {"lora_name": "beta", "lora_path": alpha}).status_code == 200
    r = pclient.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=10,
                                   temperature=0)
    assert r.choices[0].text == want
    assert_error(post(st, "/v1/load_lora_adapter",
                      {"lora_name": "gamma", "lora_path": "/nonexistent/adapter"}), 400,
                 "/nonexistent/adapter", param="lora_path")
    assert post(st, "/v1/unload_lora_adapter", {"lora_name": "beta"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        pclient.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=2)


def test_refusals_and_disconnects_leave_the_others_running(
        pclient: openai.OpenAI, proc_server: tuple[ServerThread, ProcessEngineClient]) -> None:
    st, engine = proc_server
    stream = pclient.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=48,
                                        temperature=0, stream=True)
    first = next(stream)
    # refused by the engine's process (the grammar compiles there): a 400 naming why
    r = post(st, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}})
    assert r.status_code == 400, r.text
    # a stream closed early is aborted in the engine's process
    gone = pclient.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4000,
                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(gone)
    gone.close()
    rest = "".join(c.choices[0].text for c in stream)
    whole = pclient.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=48,
                                       temperature=0)
    assert first.choices[0].text + rest == whole.choices[0].text
    wait_idle(engine)


def test_a_build_error_is_raised_where_the_server_starts() -> None:
    with pytest.raises(ValueError, match="--lora names a more than once"):
        start("--lora", "a=/x", "--lora", "a=/y")


def test_a_dead_engine_process_fails_its_requests_and_the_health_check() -> None:
    st, engine = start()
    try:
        with httpx.stream("POST", st.base_url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True,
                "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.pid is not None
            os.kill(engine.pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        assert "killed by SIGKILL" in rest[-2] and rest[-1] == "data: [DONE]", rest[-2:]
        health = httpx.get(st.base_url + "/health")
        assert health.status_code == 503
        r2 = httpx.post(st.base_url + "/v1/completions", timeout=10,
                        json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r2.status_code == 503, r2.text
    finally:
        st.stop()
    assert not engine.running


def test_a_cpu_engine_process_leaves_cores_to_the_server() -> None:
    assert engine_cpu_threads("cpu", 1, None, 2) == 1
    assert engine_cpu_threads("cpu", None, None, 2) == 2      # the default: none on 2 cores
    assert engine_cpu_threads("cpu", None, None, 16) == 15    # one on 8 or more
    assert [engine_cpu_threads("cpu", None, None, n) for n in (7, 8)] == [7, 7]
    assert engine_cpu_threads("cpu", 1, None, 16) == 15
    assert engine_cpu_threads("cpu", 4, None, 2) == 1
    assert engine_cpu_threads("cpu", 0, None, 8) == 8
    assert engine_cpu_threads("cpu", 1, "3", 16) is None      # OMP_NUM_THREADS decides
    assert engine_cpu_threads("cuda", 1, None, 16) is None


def test_only_serve_takes_the_engine_process_flags(capsys: pytest.CaptureFixture) -> None:
    """`taskloom batch` has no HTTP side to split its engine from: flags it would ignore are
    refused, not accepted."""
    a = build_parser().parse_args(["serve", "--no-engine-process", "--reserved-cpus", "0"])
    assert (a.engine_process, a.reserved_cpus) == (False, 0)
    for flag in ("--no-engine-process", "--reserved-cpus=2"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["batch", "in.jsonl", "out.jsonl", flag])
        assert "unrecognized arguments" in capsys.readouterr().err
