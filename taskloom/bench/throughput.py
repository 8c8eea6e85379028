"""Offline throughput: N requests of given input/output lengths through `LLM.generate` in one
continuous batch, output and total tokens/s; optionally the same workload through a peer."""
from __future__ import annotations

import argparse
import logging
import random
import time

from taskloom.bench.common import run_info
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


def run_throughput(a: argparse.Namespace) -> dict:
    from taskloom.cli import make_llm
    llm = make_llm(a)
    prompts = make_prompts(a.num_prompts, a.unique_len or a.input_len, a.input_len_range,
                           llm.engine.vocab_size, a.dataset_seed, a.shared_prefix,
                           a.num_prefixes)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    cache = llm.engine.scheduler.kv.stats
    queries0, hits0 = cache.queries, cache.hits
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    queries, hits = cache.queries - queries0, cache.hits - hits0
    n_in = sum(len(p) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    result = {
        "bench": "throughput", "model": a.model or "embedded:SmolLM2-135M-Instruct",
        "random_weights": a.random_weights, "dtype": a.dtype, "num_prompts": len(prompts),
        "input_len": a.input_len_range or a.input_len, "output_len": a.output_len,
        "shared_prefix": a.shared_prefix, "num_prefixes": a.num_prefixes,
        "unique_len": a.unique_len,
        "prefix_caching": a.enable_prefix_caching, "prefix_aware_order": a.prefix_aware_order,
        "prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
        "elapsed_s": round(elapsed, 3), "requests_per_s": round(len(prompts) / elapsed, 3),
        "output_tokens_per_s": round(n_out / elapsed, 2),
        "total_tokens_per_s": round((n_in + n_out) / elapsed, 2),
        **run_info(a.device),
    }
    if a.peer == "hf":
        del llm
        from taskloom.bench.peers import hf_generate_throughput
        peer = hf_generate_throughput(a, prompts)
        result["peer"] = peer
        result["ratio_vs_peer"] = round(result["output_tokens_per_s"]
                                        / peer["output_tokens_per_s"], 3)
    return result
