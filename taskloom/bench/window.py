"""`taskloom bench window`: what KV compression by a sliding window costs in quality and what
it saves, against full attention, in one run.

Every setting (full attention, then each of `--windows` with each of `--sinks` attention
sinks) scores the same passages: the log-probability of each token given the tokens before it
as the setting lets the model see them (prompt logprobs, in chunks of
`--max-num-batched-tokens`, which the window's per-position masks make exact). The line
reports perplexity over every position and over those past the largest window, where the
window changes what a query sees; the KV blocks the pool held at once for all the passages
(the memory a window saves grows with the context); and the prompt tokens scored a second.
StreamingLLM's finding is that a window alone drops the first tokens, on which attention
with nowhere better to go settles, and perplexity jumps; a few sinks bring it back.

The built-in passages come from Python's reference documentation (`pydoc_data.topics`,
shipped with CPython): English prose with code, offline and deterministic. `--text-file`
takes a UTF-8 file of your own instead; either is cut into `--num-texts` passages of
`--context-len` tokens.
"""
from __future__ import annotations

import argparse
import math
import time

from taskloom.bench.common import build_llm, release_device_memory, run_info
from taskloom.sampling_params import SamplingParams


def builtin_text() -> str:
    """Python's reference documentation topics, in a fixed order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics))


def passages(ids: list[int], num: int, length: int) -> list[list[int]]:
    """`num` consecutive passages of `length` tokens; ValueError if the text is too short."""
    if len(ids) < num * length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --num-texts {num} x "
                         f"--context-len {length}")
    return [ids[i * length:(i + 1) * length] for i in range(num)]


def settings(a: argparse.Namespace) -> list[tuple[int | None, int]]:
    """(window, sinks) of each run: full attention first."""
    for w in a.windows:
        if not 1 <= w < a.context_len:
            raise ValueError(f"--windows must lie in [1, --context-len), got {w}")
    return [(None, 0)] + [(w, s) for w in a.windows for s in a.sinks]


def score(a: argparse.Namespace, texts: list[list[int]] | None, window: int | None,
          sinks: int) -> tuple[dict, list[list[int]]]:
    """One setting's result, and the passages (tokenized by the first run)."""
    b = argparse.Namespace(**{**vars(a), "sliding_window": window, "num_sink_tokens": sinks})
    llm, startup_s = build_llm(b)
    if texts is None:
        text = open(a.text_file, encoding="utf-8").read() if a.text_file else builtin_text()
        texts = passages(llm.tokenizer.encode(text), a.num_texts, a.context_len)
    pool = llm.engine.scheduler.kv.pool
    pool.max_used = pool.num_blocks - pool.num_free_blocks
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start = time.perf_counter()
    outs = llm.generate(texts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    past = max(a.windows)
    nll_all, nll_past = [], []
    for text, out in zip(texts, outs):
        assert out.prompt_logprobs is not None
        for pos in range(1, len(text)):
            lp = -out.prompt_logprobs[pos][text[pos]].logprob
            nll_all.append(lp)
            if pos >= past:
                nll_past.append(lp)
    result = {
        "window": window, "sinks": sinks,
        "perplexity": round(math.exp(sum(nll_all) / len(nll_all)), 4),
        "perplexity_past_window": round(math.exp(sum(nll_past) / len(nll_past)), 4),
        "max_kv_blocks": pool.max_used, "block_size": a.block_size,
        "prompt_tokens_per_s": round(sum(map(len, texts)) / elapsed, 1),
        "startup_s": startup_s,
    }
    del llm
    release_device_memory(a.device)
    return result, texts


def run_window(a: argparse.Namespace) -> dict:
    """Every setting in turn; the JSON result, one entry of `results` per setting."""
    runs: list[dict] = []
    texts: list[list[int]] | None = None
    for window, sinks in settings(a):
        result, texts = score(a, texts, window, sinks)
        runs.append(result)
    return {"bench": "window", "model": a.model or "embedded:SmolLM2-135M-Instruct",
            "dtype": a.dtype, "num_texts": a.num_texts, "context_len": a.context_len,
            "text": a.text_file or "pydoc_data.topics",
            "max_num_batched_tokens": a.max_num_batched_tokens, "results": runs,
            **run_info(a.device)}
