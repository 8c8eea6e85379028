"""`taskloom bench spec`: speculative decoding (prompt lookup, or Medusa or Hydra heads)
against the same engine without it, in the same run.

Prompt lookup pays only where the output repeats the input, so random token ids (the other
benchmarks' workload) would measure nothing: the built-in workload is code editing, each
prompt a function from Python's standard library with the request to return it with type hints
added and nothing else changed (offline, deterministic, and the task prompt lookup is known
for). `--prompts-file` takes a JSONL file of your own (`{"prompt": "..."}` or
`{"messages": [...]}` per line) instead. Prompts go through the model's chat template.

Per batch size B, B requests run at once with and without drafts, alternately `--repeats`
times, each keeping its fastest run, after a warm-up that puts their prompts in the prefix
cache (every timed run then prefills nothing, and the runs compare their decoding). The line
reports output tokens/s of both, the speedup, the acceptance rate, the tokens a draft had
accepted, and whether the outputs were the same (they must be: greedy and seeded outputs do
not depend on the drafts). `--peer hf` also runs HF transformers `generate` with its own
prompt lookup (`prompt_lookup_num_tokens`; batch 1 only in HF) on the first
`--peer-num-prompts` prompts, for a ratio against taskloom with drafts on the same prompts
(each prompt alone in both, taskloom's run first, before any of them is in its prefix cache,
since HF computes every prompt whole).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
import time
from collections.abc import Iterator

from taskloom.bench.common import (build_llm, release_device_memory, run_info,
                                   speculative_fields)
from taskloom.config import SpeculativeConfig
from taskloom.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Modules whose plain functions make the built-in code-editing prompts.
_SOURCE_MODULES = ("textwrap", "shlex", "difflib", "heapq", "bisect", "fnmatch", "colorsys",
                   "calendar", "statistics", "string", "glob", "json.decoder")
_TASK = ("Rewrite this Python function with type hints added to its signature. Change "
         "nothing else, and answer with the whole function only.\n\n```python\n{}```")


def stdlib_functions(min_lines: int = 6, max_lines: int = 30) -> Iterator[str]:
    """Sources of the standard library's plain functions of `min_lines` to `max_lines`
    lines, in a fixed order."""
    for name in _SOURCE_MODULES:
        module = importlib.import_module(name)
        for _, fn in sorted(inspect.getmembers(module, inspect.isfunction)):
            if fn.__module__ != module.__name__:
                continue
            try:
                src = inspect.getsource(fn)
            except (OSError, TypeError):
                continue
            if min_lines <= src.count("\n") <= max_lines:
                yield src


_TOPIC_TASKS = ("Explain {} in Python in a few sentences.",
                "Give a short example of {} in Python and explain it.",
                "What should a beginner know about {} in Python?",
                "Write a short tutorial paragraph about {} in Python.")


def topic_conversations(split: str) -> list[list[dict]]:
    """Open-ended questions on the topics of Python's reference documentation (offline:
    `pydoc_data.topics`), four per topic: answers that do not repeat their prompts, where
    prompt lookup finds little and learned drafts (Medusa heads) must guess. Every fifth
    topic is held out: split "eval" has those, "train" the others (train-medusa's default)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    from pydoc_data.topics import topics
    names = [name.replace("-", " ") for name in sorted(topics)]
    held_out = split == "eval"
    return [[{"role": "user", "content": task.format(name)}]
            for i, name in enumerate(names) if (i % 5 == 0) == held_out
            for task in _TOPIC_TASKS]


def builtin_conversations(num: int) -> list[list[dict]]:
    sources = list(stdlib_functions())
    if not sources:
        raise ValueError("found no standard-library sources for the built-in workload; "
                         "give --prompts-file")
    return [[{"role": "user", "content": _TASK.format(sources[i % len(sources)])}]
            for i in range(num)]


def jsonl_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of every non-blank line of a JSONL file."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{n}: expected a JSON object")
                yield n, row


def file_conversations(path: str) -> list[list[dict]]:
    """The conversations of a JSONL file: `{"prompt": str}` or `{"messages": [...]}` lines."""
    convs = []
    for n, row in jsonl_rows(path):
        if isinstance(row.get("messages"), list):
            convs.append(row["messages"])
        elif isinstance(row.get("prompt"), str):
            convs.append([{"role": "user", "content": row["prompt"]}])
        else:
            raise ValueError(f"{path}:{n}: expected a \"prompt\" string or a "
                             f"\"messages\" list")
    if not convs:
        raise ValueError(f"{path} holds no prompts")
    return convs


def _timed(llm, prompts: list[list[int]], params: SamplingParams, drafts: bool) -> dict:
    """One run of the prompts at once, with or without drafts (the engine's proposer is
    set aside for the run without: same engine, same pool, same everything else)."""
    sched = llm.engine.scheduler
    proposer, stats, steps = sched.proposer, sched.spec_stats, llm.engine.step_times.steps
    drafted, accepted = stats.num_draft_tokens, stats.num_accepted_tokens
    num_drafts = stats.num_drafts
    sched.proposer = proposer if drafts else None
    try:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        sched.proposer = proposer
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"elapsed_s": round(elapsed, 3), "output_tokens": n_out,
           "output_tokens_per_s": round(n_out / elapsed, 2),
           "steps": llm.engine.step_times.steps - steps,
           "token_ids": [o.outputs[0].token_ids for o in outs]}
    if drafts:
        d, acc = stats.num_draft_tokens - drafted, stats.num_accepted_tokens - accepted
        row.update(draft_tokens=d, accepted_tokens=acc,
                   acceptance_rate=round(acc / d, 3) if d else 0.0,
                   accepted_per_draft=round(acc / max(stats.num_drafts - num_drafts, 1), 2))
    return row


def _best(runs: list[dict]) -> dict:
    return min(runs, key=lambda r: r["elapsed_s"])


def _compare(llm, batch: list[list[int]], params: SamplingParams, repeats: int) -> dict:
    """The batch with and without drafts, alternately `repeats` times, each its fastest."""
    # the prompts go into the prefix cache first, so that every timed run does the same
    # prefill work (none to speak of) and the runs compare their decoding
    llm.generate(batch, SamplingParams(max_tokens=1), use_tqdm=False)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(repeats):
        for drafts in (False, True):
            runs[drafts].append(_timed(llm, batch, params, drafts))
    base, spec = _best(runs[False]), _best(runs[True])
    same = all(r["token_ids"] == base["token_ids"] for r in runs[False] + runs[True])
    for r in (base, spec):
        del r["token_ids"]
    return {"batch_size": len(batch), "base": base, "spec": spec,
            "speedup": round(spec["output_tokens_per_s"] / base["output_tokens_per_s"], 3),
            "outputs_identical": same}


def run_spec(a: argparse.Namespace) -> dict:
    if a.random_weights:
        raise ValueError("bench spec runs text workloads, which need the model's tokenizer "
                         "and real weights; --random-weights has neither")
    if a.temperature > 0 and a.seed is None:
        raise ValueError("--temperature above 0 needs --seed: runs with and without drafts "
                         "give the same tokens only for the same seed")
    if a.speculative_config is None:
        a.speculative_config = {"method": "ngram", "num_speculative_tokens": 4}
    method = a.speculative_config.get("method")
    if a.peer == "hf" and method in ("medusa", "hydra"):
        raise ValueError(f"--peer hf runs HF's prompt lookup, which is not {method} (HF "
                         f"transformers has no draft-head decoding); the run without drafts "
                         f"in the same engine is the comparison")
    a.max_num_seqs = max(a.max_num_seqs, max(a.batch_sizes))
    llm, startup_s = build_llm(a)
    if a.prompts_file:
        convs, workload = file_conversations(a.prompts_file), a.prompts_file
    elif a.workload == "topics":
        convs, workload = topic_conversations("eval"), "builtin:topics-eval"
    else:
        convs, workload = builtin_conversations(max(a.batch_sizes)), "builtin:code-edit"
    prompts = [llm.encode_chat(c) for c in convs]
    params = SamplingParams(max_tokens=a.output_len, temperature=a.temperature, seed=a.seed)
    warm_up = llm.encode_chat([{"role": "user", "content": "Say hello."}])
    llm.generate([warm_up], SamplingParams(max_tokens=4), use_tqdm=False)
    # the HF peer's comparison first, while no prompt of the workload is cached
    ours = (_one_at_a_time(llm, prompts[:a.peer_num_prompts], a.output_len)
            if a.peer == "hf" else None)
    results = [_compare(llm, [prompts[i % len(prompts)] for i in range(b)], params,
                        a.repeats) for b in a.batch_sizes]
    spec_config = llm.config.speculative
    assert spec_config is not None
    result = {"bench": "spec", "model": a.model or "embedded:SmolLM2-135M-Instruct",
              "dtype": a.dtype, "workload": workload,
              "num_prompts": len(prompts), "output_len": a.output_len,
              "temperature": a.temperature, "speculative_config": speculative_fields(llm),
              "repeats": a.repeats, "startup_s": startup_s, "results": results,
              **run_info(a.device)}
    if ours is not None:
        del llm
        release_device_memory(a.device)
        peer = _hf_prompt_lookup(a, prompts[:a.peer_num_prompts], spec_config)
        peer["outputs_identical"] = peer.pop("token_ids") == ours.pop("token_ids")
        result.update(peer=peer, peer_taskloom=ours,
                      ratio_vs_peer=round(ours["output_tokens_per_s"]
                                          / peer["output_tokens_per_s"], 3))
    return result


def _one_at_a_time(llm, prompts: list[list[int]], output_len: int) -> dict:
    """taskloom with drafts on each prompt alone, greedy: what the HF peer runs."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0)
    token_ids, elapsed = [], 0.0
    for p in prompts:
        start = time.perf_counter()
        (out,) = llm.generate([p], params, use_tqdm=False)
        elapsed += time.perf_counter() - start
        token_ids.append(out.outputs[0].token_ids)
    n_out = sum(map(len, token_ids))
    return {"num_prompts": len(prompts), "elapsed_s": round(elapsed, 3),
            "output_tokens_per_s": round(n_out / elapsed, 2), "token_ids": token_ids}


def _hf_prompt_lookup(a: argparse.Namespace, prompts: list[list[int]],
                      config: SpeculativeConfig) -> dict:
    """HF `generate` with its prompt lookup (greedy, batch 1: all HF supports), each prompt
    alone, up to `a.output_len` new tokens or the model's end of sequence."""
    import torch

    from taskloom.bench.peers import load_hf_model
    model = load_hf_model(a)
    gen = dict(do_sample=False, max_new_tokens=a.output_len,
               prompt_lookup_num_tokens=config.num_speculative_tokens,
               max_matching_ngram_size=config.prompt_lookup_max)
    token_ids, elapsed = [], 0.0
    with torch.inference_mode():
        for i, p in enumerate(prompts):
            ids = torch.tensor([p], device=a.device)
            mask = torch.ones_like(ids)
            if i == 0:      # warm-up
                model.generate(input_ids=ids, attention_mask=mask, **{**gen,
                                                                       "max_new_tokens": 4})
            start = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, **gen)
            elapsed += time.perf_counter() - start
            token_ids.append(out[0, ids.shape[1]:].tolist())
    n_out = sum(map(len, token_ids))
    return {"name": "hf-transformers-generate-prompt-lookup", "num_prompts": len(prompts),
            "elapsed_s": round(elapsed, 3), "output_tokens_per_s": round(n_out / elapsed, 2),
            "token_ids": token_ids}

