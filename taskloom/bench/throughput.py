"""Offline throughput: N requests of given input/output lengths through `LLM.generate` in one
continuous batch, output and total tokens/s; optionally the same workload through a peer.

Workloads: fixed or random lengths; a shared prefix (a long system prompt or few-shot
examples, `--shared-prefix`) before each request's own tokens; and multi-turn chat
(`--turns`): every conversation sends its whole history plus a new user message each turn,
all conversations of a turn in one batch, so each turn's prompt starts with the last one's
prompt and answer."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time

from taskloom.bench.common import (add_profile, build_llm, release_device_memory, run_info,
                                   speculative_fields, trace_path, window_fields)
from taskloom.bench.profile import profile_steps
from taskloom.engine.prefix_order import prefix_grouped_order
from taskloom.outputs import OutputKind
from taskloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


def make_prompts(num: int, input_len: int, len_range: tuple[int, int] | None, vocab: int,
                 seed: int, shared_prefix: int = 0, num_prefixes: int = 1) -> list[list[int]]:
    """Random token-id prompts (ids above the first 256, which hold most special tokens);
    with `shared_prefix`, prompt i starts with prefix i % num_prefixes of that many tokens
    (the groups interleave, as requests of several tasks arrive)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(256, vocab) for _ in range(shared_prefix)]
                for _ in range(num_prefixes)]
    lens = [rng.randint(*len_range) if len_range else input_len for _ in range(num)]
    return [prefixes[i % num_prefixes] + [rng.randrange(256, vocab) for _ in range(n)]
            for i, n in enumerate(lens)]


def warmup_prompts(vocab: int, seed: int) -> list[list[int]]:
    """Two short prompts sharing no block with any workload prompt: a warm-up with workload
    prompts would leave their blocks in the prefix cache and flatter the timed run."""
    return make_prompts(2, 16, None, vocab, seed + 1_000_003)


def run_throughput(a: argparse.Namespace) -> dict:
    if a.turns < 1:
        raise ValueError(f"--turns must be >= 1, got {a.turns}")
    if a.peer_num_prompts is not None and (a.peer is None or a.peer_num_prompts < 1):
        raise ValueError(f"--peer-num-prompts needs --peer and must be >= 1, got "
                         f"{a.peer_num_prompts}")
    if a.peer and a.turns > 1:
        raise ValueError("--peer runs single-turn workloads only (not --turns)")
    if getattr(a, "profile", False) and a.turns > 1:
        raise ValueError("--profile profiles single-turn workloads only (not --turns)")
    llm, startup_s = build_llm(a)
    prompts = make_prompts(a.num_prompts, a.unique_len or a.input_len, a.input_len_range,
                           llm.engine.vocab_size, a.dataset_seed, a.shared_prefix,
                           a.num_prefixes)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(warmup_prompts(llm.engine.vocab_size, a.dataset_seed),
                 SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    cache, spec = llm.engine.scheduler.kv.stats, llm.engine.scheduler.spec_stats
    queries0, hits0 = cache.queries, cache.hits
    drafted0, accepted0 = spec.num_draft_tokens, spec.num_accepted_tokens
    times0 = dataclasses.replace(llm.engine.step_times)
    start = time.perf_counter()
    n_in, n_out = _run_turns(llm, prompts, params, a.turns, a.user_len or a.input_len,
                             a.dataset_seed)
    elapsed = time.perf_counter() - start
    queries, hits = cache.queries - queries0, cache.hits - hits0
    result = {
        "bench": "throughput", "model": a.model or "embedded:SmolLM2-135M-Instruct",
        "random_weights": a.random_weights, "dtype": a.dtype,
        "quantization": a.quantization, "num_prompts": len(prompts),
        "input_len": a.input_len_range or a.input_len, "output_len": a.output_len,
        "shared_prefix": a.shared_prefix, "num_prefixes": a.num_prefixes,
        "unique_len": a.unique_len, "turns": a.turns, "user_len": a.user_len,
        "prefix_caching": a.enable_prefix_caching, "prefix_aware_order": a.prefix_aware_order,
        "async_scheduling": a.async_scheduling,
        "shared_prefix_attention": a.shared_prefix_attention,
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "speculative_config": speculative_fields(llm), "sliding_window": window_fields(llm),
        "spec_acceptance_rate": _rate(spec.num_accepted_tokens - accepted0,
                                      spec.num_draft_tokens - drafted0),
        "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
        "startup_s": startup_s, "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(prompts) * a.turns / elapsed, 3),
        "output_tokens_per_s": round(n_out / elapsed, 2),
        "total_tokens_per_s": round((n_in + n_out) / elapsed, 2),
        "step_ms": llm.engine.step_times.since(times0).per_step_ms(),
        **run_info(a.device),
    }
    if getattr(a, "profile", False):
        add_profile(result, result, a, lambda: _profile_run(a, llm, params))
    if a.peer:
        ours = result
        if a.peer_num_prompts is not None and a.peer_num_prompts < len(prompts):
            prompts, ours = _peer_workload(a, llm, params)
            result["peer_workload"] = ours
        del llm
        release_device_memory(a.device)
        from taskloom.bench import peers
        run_peer = (peers.hf_generate_batch_throughput if a.peer == "hf"
                    else peers.hf_generate_throughput)
        peer = run_peer(a, prompts)
        result["peer"] = peer
        result["ratio_vs_peer"] = round(ours["output_tokens_per_s"]
                                        / peer["output_tokens_per_s"], 3)
    return result


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


def _profile_run(a: argparse.Namespace, llm, params: SamplingParams) -> dict:
    """The profile of a window of steps of the workload, run again on new prompts of the same
    distribution (another seed: none is cached from the timed run) in the order
    `LLM.generate` admits them: steps to the steady state (`_warm_up`), `--profile-steps`
    profiled, then the rest aborted."""
    import torch
    engine = llm.engine
    prompts = make_prompts(a.num_prompts, a.unique_len or a.input_len, a.input_len_range,
                           engine.vocab_size, a.dataset_seed + 2, a.shared_prefix,
                           a.num_prefixes)
    order = (prefix_grouped_order(prompts, [0] * len(prompts)) if llm.prefix_aware_order
             else range(len(prompts)))
    ids = [f"throughput-profile-{i}" for i in order]
    try:
        for rid, i in zip(ids, order):
            engine.add_request(rid, prompts[i], params, output_kind=OutputKind.FINAL_ONLY)
        warmup = _warm_up(engine, a.profile_warmup_steps, a.output_len)
        before = dataclasses.replace(engine.step_times)
        profile = profile_steps(engine, a.profile_steps, torch.device(a.device),
                                trace_path(a, "throughput"))
        profile["step_ms"] = engine.step_times.since(before).per_step_ms()
    finally:
        for rid in ids:
            engine.abort(rid)
        engine.step()           # takes in a step still in flight (async scheduling)
    profile["warmup_steps"] = warmup
    return profile


def _warm_up(engine, steps: int | None, output_len: int) -> int:
    """Step the engine to where its profile says most about the run; the steps taken. Given
    `steps`, that many. Else until the steady state: the first request has finished (later
    requests now enter as earlier ones leave, so steps mix prefill chunks and decodes), or
    every request is running and decoding (the whole workload fits at once), and then
    `output_len // 4` (at most 16) steps more."""
    sched = engine.scheduler

    def steady(outputs) -> bool:
        return any(o.finished for o in outputs) or (not sched.waiting and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running))

    taken, more = 0, None
    while engine.has_unfinished and taken < (steps if steps is not None else 4096):
        outputs = engine.step()
        taken += 1
        if steps is None and more is None and steady(outputs):
            more = min(output_len // 4, 16)
        if more is not None:
            if more == 0:
                break
            more -= 1
    return taken


def _peer_workload(a: argparse.Namespace, llm, params: SamplingParams
                   ) -> tuple[list[list[int]], dict]:
    """A smaller workload for a slow peer (`--peer-num-prompts N`): N new prompts of the same
    distribution (another seed, so that none is in the prefix cache from the main run), timed
    through taskloom here and then through the peer, so that the ratio compares one workload."""
    prompts = make_prompts(a.peer_num_prompts, a.unique_len or a.input_len, a.input_len_range,
                           llm.engine.vocab_size, a.dataset_seed + 1, a.shared_prefix,
                           a.num_prefixes)
    start = time.perf_counter()
    n_in, n_out = _run_turns(llm, prompts, params, 1, 0, a.dataset_seed)
    elapsed = time.perf_counter() - start
    return prompts, {"num_prompts": len(prompts), "elapsed_s": round(elapsed, 3),
                     "output_tokens_per_s": round(n_out / elapsed, 2),
                     "total_tokens_per_s": round((n_in + n_out) / elapsed, 2)}


def _run_turns(llm, prompts: list[list[int]], params: SamplingParams, turns: int,
               user_len: int, seed: int) -> tuple[int, int]:
    """`turns` rounds of generation: round 0 answers `prompts`, each later round every
    conversation's history (prompts and answers so far) plus `user_len` new random tokens.
    Returns the prompt and output tokens processed in all."""
    rng = random.Random(seed + 1)
    vocab = llm.engine.vocab_size
    history = [list(p) for p in prompts]
    n_in = n_out = 0
    for turn in range(turns):
        if turn:
            for h in history:
                h.extend(rng.randrange(256, vocab) for _ in range(user_len))
        outs = llm.generate(history, params, use_tqdm=False)
        n_in += sum(len(h) for h in history)
        for h, out in zip(history, outs):
            h.extend(out.outputs[0].token_ids)
            n_out += len(out.outputs[0].token_ids)
    return n_in, n_out
