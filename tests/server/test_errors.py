"""Raw HTTP: every client mistake gets a 4xx in OpenAI's error shape with a message that names
the problem, never a 500; auth, queue limits, and the server keeps serving afterwards."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from taskloom import LLM
from taskloom.server.launch import ServerThread
from tests.server.conftest import MODEL, start_server

KEY = "sk-test-Secret-4242"


def post(server: ServerThread, path: str, body: object = None, *, content: bytes | None = None,
         headers: dict | None = None) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, content=content, headers=headers,
                      timeout=120)


def assert_error(r: httpx.Response, status: int, *words: str, param: str | None = None,
                 type_: str = "invalid_request_error") -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])
    if param is not None:
        assert err["param"] == param, err
    return err


def test_malformed_json(server: ServerThread) -> None:
    r = post(server, "/v1/completions", content=b'{"model": "smol", "prompt": ',
             headers={"content-type": "application/json"})
    assert_error(r, 400, "json")
    r = post(server, "/v1/chat/completions", content=b"[1, 2]",
             headers={"content-type": "application/json"})
    assert_error(r, 400, "json object")


BAD_BODIES = [
    ({"prompt": "x"}, "model", "model"),
    ({"model": MODEL, "prompt": "x", "temperature": "hot"}, "temperature", "number"),
    ({"model": MODEL, "prompt": "x", "max_tokens": "ten"}, "max_tokens", "integer"),
    ({"model": MODEL, "prompt": 5}, "prompt", "prompt"),
    ({"model": MODEL, "prompt": ["a", 3]}, "prompt", "prompt"),
    ({"model": MODEL, "prompt": "x", "stop": 3}, "stop", "stop"),
    ({"model": MODEL, "prompt": "x", "temperature": -1}, "temperature", ">= 0"),
    ({"model": MODEL, "prompt": "x", "top_p": 0}, "top_p", "(0, 1]"),
    ({"model": MODEL, "prompt": "x", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"model": MODEL, "prompt": "x", "n": 0}, "n", ">= 1"),
    ({"model": MODEL, "prompt": "x", "max_tokens": 0}, "max_tokens", ">= 1"),
    ({"model": MODEL, "prompt": "x", "logprobs": 21}, "logprobs", "between 0 and 20"),
    ({"model": MODEL, "prompt": "x", "presence_penalty": 3}, "presence_penalty", "[-2, 2]"),
    ({"model": MODEL, "prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty", "[-2, 2]"),
    ({"model": MODEL, "prompt": "x", "top_k": -3}, "top_k", "top_k"),
    ({"model": MODEL, "prompt": "x", "min_p": 2}, "min_p", "[0, 1]"),
    ({"model": MODEL, "prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"model": MODEL, "prompt": "x", "min_tokens": 20, "max_tokens": 5}, "min_tokens", "<="),
    ({"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ({"model": MODEL, "prompt": []}, "prompt", "empty"),
    ({"model": MODEL, "prompt": [10**9]}, "prompt", "vocabulary"),
    ({"model": MODEL, "prompt": "x", "stream_options": {"include_usage": "yes"}},
     "stream_options", "bool"),
]


@pytest.mark.parametrize("body,param,words", BAD_BODIES,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_BODIES)])
def test_bad_completion_bodies(server: ServerThread, body: dict, param: str, words: str) -> None:
    assert_error(post(server, "/v1/completions", body), 400, words, param=param)


BAD_CHATS = [
    ({"model": MODEL}, "messages", "messages"),
    ({"model": MODEL, "messages": []}, "messages", "at least 1"),
    ({"model": MODEL, "messages": "hi"}, "messages", "list"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages", "role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages", "text"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     "top_logprobs", "logprobs"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
      "top_logprobs": 30}, "top_logprobs", "between 0 and 20"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "max_completion_tokens": 0}, "max_completion_tokens", ">= 1"),
]


@pytest.mark.parametrize("body,param,words", BAD_CHATS,
                         ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD_CHATS)])
def test_bad_chat_bodies(server: ServerThread, body: dict, param: str, words: str) -> None:
    assert_error(post(server, "/v1/chat/completions", body), 400, words, param=param)


def test_unknown_model_and_route(server: ServerThread) -> None:
    err = assert_error(post(server, "/v1/completions", {"model": "gpt-9", "prompt": "x"}), 404,
                       "gpt-9", MODEL, param="model")
    assert err["code"] == "model_not_found"
    assert_error(post(server, "/v1/chat/completions", {
        "model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404, "nope")
    assert_error(httpx.get(server.base_url + "/v1/nothing"), 404, "not found",
                 type_="not_found_error")
    assert_error(httpx.get(server.base_url + "/v1/completions"), 405, "method not allowed")


def test_prompt_over_context_length(server: ServerThread, server_llm: LLM) -> None:
    ctx = server_llm.engine.scheduler.max_model_len
    long_ids = [1] * (ctx + 10)
    err = assert_error(post(server, "/v1/completions", {"model": MODEL, "prompt": long_ids}),
                       400, str(ctx), str(ctx + 10), param="prompt")
    assert err["code"] == "context_length_exceeded"
    err = assert_error(post(server, "/v1/completions", {
        "model": MODEL, "prompt": [1] * (ctx - 10), "max_tokens": 100}), 400,
        f"{ctx + 90} tokens", f"{ctx - 10} in the prompt", "100 in the completion")
    long_text = "word " * (ctx + 100)
    assert_error(post(server, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": long_text}]}), 400,
        "maximum context length", param="messages")


def test_fuzzed_bodies_never_500(server: ServerThread) -> None:
    bodies = [None, 1, "x", [], {}, {"model": None}, {"model": MODEL, "prompt": None},
              {"model": MODEL, "prompt": [[1, 2], "a"]}, {"model": MODEL, "prompt": [[]]},
              {"model": MODEL, "prompt": "x", "n": 1.5}, {"model": MODEL, "prompt": "x",
                                                         "seed": "1"},
              {"model": MODEL, "messages": [{"content": "no role"}]},
              {"model": MODEL, "messages": [{"role": "user", "content": None}],
               "max_tokens": -5}, {"model": MODEL, "prompt": "x", "echo": "yes"}]
    for path in ("/v1/completions", "/v1/chat/completions"):
        for body in bodies:
            r = post(server, path, body)
            assert 400 <= r.status_code < 500, (path, body, r.text)
            assert r.json()["error"]["message"]
    assert httpx.get(server.base_url + "/health").status_code == 200


# ----- a server with an API key and a queue limit ------------------------------------------------
@pytest.fixture(scope="module")
def guarded_llm() -> LLM:
    return LLM(max_num_seqs=1, kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def guarded(guarded_llm: LLM) -> Iterator[ServerThread]:
    st = start_server(guarded_llm, api_key=KEY, max_queue=1)
    yield st
    st.stop()


def test_api_key(guarded: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    caplog.set_level(logging.DEBUG)
    err = assert_error(post(guarded, "/v1/completions", body), 401, "api key")
    assert err["code"] == "missing_api_key"
    err = assert_error(post(guarded, "/v1/completions", body,
                            headers={"Authorization": "Bearer wrong"}), 401, "incorrect")
    assert err["code"] == "invalid_api_key"
    assert_error(httpx.get(guarded.base_url + "/v1/models",
                           headers={"Authorization": f"Basic {KEY}"}), 401)
    for path, tokenize_body in (("/tokenize", {"prompt": "Hi"}), ("/detokenize", {"tokens": [1]})):
        assert_error(post(guarded, path, tokenize_body), 401, "api key")
        assert post(guarded, path, tokenize_body,
                    headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    ok = post(guarded, "/v1/completions", body, headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    assert httpx.get(guarded.base_url + "/health").status_code == 200
    assert KEY not in caplog.text


def _metric(server: ServerThread, name: str) -> float:
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_queue_full_is_429(guarded: ServerThread) -> None:
    """One sequence runs (max_num_seqs 1), one waits (max_queue 1): a third gets a 429. The
    two long requests are streams that the test then abandons, which also frees them."""
    auth = {"Authorization": f"Bearer {KEY}"}
    long_body = {"model": MODEL, "prompt": "Count:", "max_tokens": 3000, "ignore_eos": True}
    release = threading.Event()
    statuses: list[int] = []

    def hold() -> None:
        with httpx.stream("POST", guarded.base_url + "/v1/completions", headers=auth,
                          json={**long_body, "stream": True}, timeout=120) as r:
            statuses.append(r.status_code)
            release.wait(120)

    threads = [threading.Thread(target=hold) for _ in range(2)]
    try:
        threads[0].start()
        _wait_for(lambda: _metric(guarded, "taskloom_num_requests_running") == 1)
        threads[1].start()
        _wait_for(lambda: _metric(guarded, "taskloom_num_requests_waiting") == 1)
        err = assert_error(post(guarded, "/v1/completions", long_body, headers=auth), 429,
                           "--max-queue 1", type_="rate_limit_error")
        assert err["code"] == "queue_full"
    finally:
        release.set()
        for t in threads:
            t.join()
    assert statuses == [200, 200]
    _wait_for(lambda: _metric(guarded, "taskloom_num_requests_running") == 0
              and _metric(guarded, "taskloom_num_requests_waiting") == 0)
    ok = post(guarded, "/v1/completions", {**long_body, "max_tokens": 2}, headers=auth)
    assert ok.status_code == 200


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)
