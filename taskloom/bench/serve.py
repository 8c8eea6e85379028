"""Online serving benchmark: requests against a running server through its HTTP API, arriving
as a Poisson process at `--request-rate` (or all at once), optionally capped at
`--max-concurrency` in flight; reports TTFT, inter-token latency and end-to-end latency
percentiles and throughput. Streams every request with usage, so token counts are exact.

Prompts are text of about `--input-len` tokens, and a token arrives with the text it adds; with
`--token-ids` they are `--input-len` random token ids and tokens are counted by the ids each
chunk returns (`return_token_ids`), which a server whose model has no tokenizer (random
weights with a named shape) needs: it streams no text."""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx

from taskloom.bench.common import git_commit, utc_now

WORDS = ("time person year way day thing man world life hand part child eye woman place work "
         "week case point government company number group problem fact").split()


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)   # between chunks that carry output
    chunks: int = 0                                   # of those chunks


def make_prompts(num: int, input_len: int, seed: int) -> list[str]:
    """Text prompts of about `input_len` tokens (one common English word is one token)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(input_len)) for _ in range(num)]


def make_token_prompts(num: int, input_len: int, seed: int) -> list[list[int]]:
    """Prompts of `input_len` random token ids in [100, 1000): in every model's vocabulary,
    clear of the special tokens most vocabularies start with."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 1000) for _ in range(input_len)] for _ in range(num)]


async def _one(client: httpx.AsyncClient, body: dict) -> RequestResult:
    res = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    res.output_tokens = chunk["usage"]["completion_tokens"]
                if not any(c.get("text") or c.get("token_ids")
                           for c in chunk.get("choices", [])):
                    continue
                now = time.perf_counter()
                res.chunks += 1
                if res.ttft == 0.0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.e2e = time.perf_counter() - start
        res.ok = True
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def _run(a: argparse.Namespace, model: str, prompts: list[str] | list[list[int]]
               ) -> tuple[list[RequestResult], float]:
    rng = random.Random(a.seed)
    sem = asyncio.Semaphore(a.max_concurrency or len(prompts))
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    limits = httpx.Limits(max_connections=a.max_concurrency or len(prompts))
    async with httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=None,
                                 limits=limits) as client:
        async def limited(body: dict) -> RequestResult:
            async with sem:
                return await _one(client, body)

        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            body = {"model": model, "prompt": prompt, "max_tokens": a.output_len,
                    "ignore_eos": True, "temperature": 0.0, "stream": True,
                    "stream_options": {"include_usage": True}}
            if a.token_ids:
                body["return_token_ids"] = True
            tasks.append(asyncio.create_task(limited(body)))
            if math.isfinite(a.request_rate):
                await asyncio.sleep(rng.expovariate(a.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean_ms": 0.0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 \
        else [values[0]] * 99
    return {"mean_ms": round(1000 * statistics.fmean(values), 2),
            "p50_ms": round(1000 * qs[49], 2), "p90_ms": round(1000 * qs[89], 2),
            "p99_ms": round(1000 * qs[98], 2)}


def summarize(a: argparse.Namespace, model: str, results: list[RequestResult],
              duration: float) -> dict:
    done = [r for r in results if r.ok]
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    return {
        "bench": "serve", "base_url": a.base_url, "model": model,
        "num_prompts": len(results), "completed": len(done), "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "request_rate": a.request_rate if math.isfinite(a.request_rate) else "inf",
        "max_concurrency": a.max_concurrency,
        "prompts": "token_ids" if a.token_ids else "text", "input_len": a.input_len,
        "output_len": a.output_len, "duration_s": round(duration, 3),
        "requests_per_s": round(len(done) / duration, 3),
        "output_tokens_per_s": round(n_out / duration, 2),
        "total_tokens_per_s": round((n_in + n_out) / duration, 2),
        "ttft": _percentiles([r.ttft for r in done]),
        "itl": _percentiles([x for r in done for x in r.itl]),
        # above 1 when the server sends a client's tokens of several steps in one chunk (it
        # does when it falls behind the engine: taskloom.engine.client.OutputStream)
        "tokens_per_chunk": round(n_out / max(sum(r.chunks for r in done), 1), 3),
        "e2e": _percentiles([r.e2e for r in done]),
        "commit": git_commit(), "date": utc_now(),
    }


def run_serve_bench(a: argparse.Namespace) -> dict:
    if a.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0 (or inf), got {a.request_rate}")
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    try:
        models = httpx.get(a.base_url + "/v1/models", headers=headers, timeout=30)
    except httpx.HTTPError as e:
        raise ValueError(f"no server answers at {a.base_url}: {e}") from None
    if models.status_code != 200:
        raise ValueError(f"GET {a.base_url}/v1/models answered {models.status_code}: "
                         f"{models.text[:200]}")
    model = a.model or models.json()["data"][0]["id"]
    prompts = (make_token_prompts if a.token_ids else make_prompts)(a.num_prompts, a.input_len,
                                                                    a.seed)
    results, duration = asyncio.run(_run(a, model, prompts))
    return summarize(a, model, results, duration)
