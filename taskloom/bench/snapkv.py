"""`taskloom bench snapkv`: what SnapKV keeps of a long prompt, measured by retrieval, against
full attention and a sliding window of the same KV size, in one run.

Each prompt is a passage of `--context-len` tokens (Python's reference documentation, as in
`bench window`, or `--text-file`) with one needle hidden at a random depth between 10 % and
90 % ("The secret code is 48213."), then the question ("... Answer: The secret code is").
Every setting answers the same prompts greedily: full attention first, then SnapKV at each
`--budgets` with each `--kernel-sizes` pooling, then (unless `--no-window-baseline`) a
sliding window holding the same number of KV entries (budget - 4 positions and 4 attention
sinks). A line per setting reports the needles found (the code in the answer), the share of
the code's digits right in order, the answers identical to full attention's, the KV blocks
the pool held at most and at most while every request was decoding (what the compression
saves: SnapKV keeps `budget` entries a request where full attention keeps the prompt), and
the time a decode step took.

A window of `budget` positions sees only the prompt's end, so it finds a needle only when
the needle lies in it; SnapKV keeps the positions the question attends to, wherever they are.
"""
from __future__ import annotations

import argparse
import random
import re
import time

from taskloom.bench.common import build_llm, release_device_memory, run_info
from taskloom.bench.window import builtin_text
from taskloom.outputs import OutputKind
from taskloom.sampling_params import SamplingParams

NEEDLE = "\nThe secret code is {code}.\n"
QUESTION = "\n\nQuestion: what is the secret code?\nAnswer: The secret code is"
WINDOW_SINKS = 4


def needle_prompts(ids_of, text: str, num: int, length: int, seed: int
                   ) -> tuple[list[list[int]], list[str]]:
    """`num` prompts of `length` tokens, each a passage of the text's tokens with a needle at
    a random depth and the question last, and their codes. `ids_of` tokenizes."""
    rng = random.Random(seed)
    ids = ids_of(text)
    question = ids_of(QUESTION)
    prompts, codes = [], []
    for i in range(num):
        code = str(rng.randint(10000, 99999))
        needle = ids_of(NEEDLE.format(code=code))
        n = length - len(needle) - len(question)
        if n < 1 or (i + 1) * n > len(ids):
            raise ValueError(f"the text has {len(ids)} tokens: too few for --num-prompts "
                             f"{num} x --context-len {length}")
        hay = ids[i * n:(i + 1) * n]
        at = int(n * rng.uniform(0.1, 0.9))
        prompts.append(hay[:at] + needle + hay[at:] + question)
        codes.append(code)
    return prompts, codes


def digits_right(answer: str, code: str) -> float:
    """The share of the code's digits the answer's first number gives, in order."""
    found = re.search(r"\d+", answer)
    digits = found.group() if found else ""
    right = 0
    while right < min(len(digits), len(code)) and digits[right] == code[right]:
        right += 1
    return right / len(code)


def settings(a: argparse.Namespace) -> list[dict]:
    """The engine settings of each run: full attention first."""
    for b in a.budgets:
        if not a.snapkv_window < b < a.context_len:
            raise ValueError(f"--budgets must lie in (--snapkv-window, --context-len), got {b}")
    out: list[dict] = [{"method": "full"}]
    out += [{"method": "snapkv", "budget": b, "kernel_size": k, "pooling": a.snapkv_pooling,
             "window_size": a.snapkv_window} for b in a.budgets for k in a.kernel_sizes]
    if a.window_baseline:
        out += [{"method": "window", "budget": b, "sliding_window": b - WINDOW_SINKS,
                 "sinks": WINDOW_SINKS} for b in a.budgets]
    return out


def run_setting(a: argparse.Namespace, s: dict, prompts: list[list[int]] | None,
                codes: list[str] | None
                ) -> tuple[dict, list[list[int]], list[str], list[list[int]]]:
    """One setting's result, the prompts and codes (made by the first run) and its answers."""
    b = argparse.Namespace(**{**vars(a), "snapkv_budget": None, "sliding_window": None,
                              "num_sink_tokens": 0})
    if s["method"] == "snapkv":
        b.snapkv_budget, b.snapkv_kernel_size = s["budget"], s["kernel_size"]
    elif s["method"] == "window":
        b.sliding_window, b.num_sink_tokens = s["sliding_window"], s["sinks"]
    llm, startup_s = build_llm(b)
    if prompts is None or codes is None:
        text = open(a.text_file, encoding="utf-8").read() if a.text_file else builtin_text()
        prompts, codes = needle_prompts(llm.tokenizer.encode, text, a.num_prompts,
                                        a.context_len, a.seed)
    engine = llm.engine
    kv = engine.scheduler.kv
    params = SamplingParams(max_tokens=a.max_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params, output_kind=OutputKind.FINAL_ONLY)
    answers: dict[str, tuple[str, list[int]]] = {}
    peak = decode_peak = decode_steps = 0
    decode_s = 0.0
    start = time.perf_counter()
    while engine.has_unfinished:
        sched = engine.scheduler
        decoding = not sched.waiting and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running)
        t0 = time.perf_counter()
        for out in engine.step():
            if out.finished:
                answers[out.request_id] = (out.outputs[0].text, out.outputs[0].token_ids)
        used = kv.num_blocks - kv.num_free_blocks
        peak = max(peak, used)
        if decoding:
            decode_peak = max(decode_peak, used)
            decode_steps += 1
            decode_s += time.perf_counter() - t0
    elapsed = time.perf_counter() - start
    texts = [answers[str(i)][0] for i in range(len(prompts))]
    tokens = [answers[str(i)][1] for i in range(len(prompts))]
    result = {
        **s,
        "found": sum(c in t for c, t in zip(codes, texts)),
        "digits_right": round(sum(map(digits_right, texts, codes)) / len(codes), 4),
        "max_kv_blocks": peak, "decode_kv_blocks": decode_peak,
        "compressed": kv.num_compressed,
        "decode_step_ms": round(1000 * decode_s / decode_steps, 2) if decode_steps else None,
        "elapsed_s": round(elapsed, 2), "startup_s": startup_s,
        "answers": texts,
    }
    del llm, engine
    release_device_memory(a.device)
    return result, prompts, codes, tokens


def run_snapkv(a: argparse.Namespace) -> dict:
    """Every setting in turn; the JSON result, one entry of `results` per setting."""
    runs: list[dict] = []
    prompts: list[list[int]] | None = None
    codes: list[str] | None = None
    full: list[list[int]] | None = None
    for s in settings(a):
        result, prompts, codes, tokens = run_setting(a, s, prompts, codes)
        full = tokens if full is None else full
        result["same_as_full"] = sum(x == y for x, y in zip(tokens, full))
        runs.append(result)
    return {"bench": "snapkv", "model": a.model or "embedded:SmolLM2-135M-Instruct",
            "dtype": a.dtype, "num_prompts": a.num_prompts, "context_len": a.context_len,
            "text": a.text_file or "pydoc_data.topics", "block_size": a.block_size,
            "max_tokens": a.max_tokens, "seed": a.seed, "codes": codes, "results": runs,
            **run_info(a.device)}
