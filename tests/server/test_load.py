"""Load and disconnects: 64 concurrent streaming clients, a quarter of them vanishing at random
points (some while still queued); every other client gets its full, correct output, and the
server ends with nothing running or waiting and an empty KV cache, still answering."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx

from taskloom import LLM, SamplingParams
from taskloom.server.launch import ServerThread
from tests.server.conftest import MODEL

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time",
           "List three fruits:", "The meaning of life is", "import numpy as np\n",
           "Dear Sir or Madam,", "In 1969, the first"]
MAX_TOKENS = 16


async def _stream(client: httpx.AsyncClient, prompt: str, cut_after: int | None) -> str | None:
    """Stream one completion; with `cut_after`, drop the connection after that many events."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": True}
    text, events = "", 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if cut_after is not None and events >= cut_after:
                return None  # leaving the block closes the connection
            if not line.startswith("data: "):
                continue
            events += 1
            if line == "data: [DONE]":
                return text
            text += json.loads(line[6:])["choices"][0]["text"]
    raise AssertionError("stream ended without [DONE]")


async def _run_clients(base_url: str, plan: list[tuple[str, int | None]]) -> list[str | None]:
    limits = httpx.Limits(max_connections=len(plan))
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(_stream(client, p, cut) for p, cut in plan))


def _metrics(server: ServerThread) -> dict[str, float]:
    out = {}
    for line in httpx.get(server.base_url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_64_clients_a_quarter_disconnecting(server: ServerThread, oracle: LLM) -> None:
    expected = {p: o.outputs[0].text for p, o in zip(PROMPTS, oracle.generate(
        PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False))}
    rng = random.Random(0)
    plan = [(PROMPTS[i % len(PROMPTS)], rng.randrange(0, MAX_TOKENS) if i % 4 == 3 else None)
            for i in range(64)]
    results = asyncio.run(_run_clients(server.base_url, plan))
    for (prompt, cut), got in zip(plan, results):
        if cut is None:
            assert got == expected[prompt]
        else:
            assert got is None
    deadline = time.monotonic() + 30
    while True:
        m = _metrics(server)
        idle = (m["taskloom_num_requests_running"] == 0
                and m["taskloom_num_requests_waiting"] == 0
                and m["taskloom_kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert idle, m
    aborted = m['taskloom_requests_total{model_name="smol",outcome="abort"}']
    assert aborted >= 1
    after = httpx.post(server.base_url + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0})
    assert after.json()["choices"][0]["text"] == expected[PROMPTS[0]]


def test_non_streaming_disconnect_frees_blocks(server: ServerThread,
                                               server_llm: LLM) -> None:
    """A client that gives up on a long non-streaming request: aborted, blocks freed at once."""
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 2000,
            "ignore_eos": True}
    sched = server_llm.engine.scheduler
    try:
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=1.5)
    except httpx.TimeoutException:
        pass
    else:
        raise AssertionError("2000 tokens should not finish in 1.5 s on a CPU")
    t0 = time.monotonic()
    while sched.has_unfinished or sched.kv.num_free_blocks != sched.kv.num_blocks:
        assert time.monotonic() - t0 < 5, "the abandoned request kept running"
        time.sleep(0.02)
