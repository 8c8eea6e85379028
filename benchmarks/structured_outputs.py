"""What structured outputs cost: the same chat requests (the embedded model, greedy), each
asking for a record's fields as JSON, with a JSON schema and without, alternately in one
process, `--batch` at a time; with `--speculative-tokens K`, also the constrained requests on
an engine with prompt-lookup drafts (an extraction copies its source: the drafts it finds are
cut to what the grammar takes). Prints a JSON line:
per run, output tokens/s, how many outputs parse as JSON and how many max_tokens cut, and
the engine's mean milliseconds per step by phase (`masks`: the host computing the
constrained requests' masks, within `execute`, which also applies them), the best of
`--repeats`; and the host milliseconds a mask took per constrained sequence a step.

    python benchmarks/structured_outputs.py --batch 16 --max-tokens 96
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time

from taskloom import LLM, SamplingParams, StructuredOutputs
from taskloom.bench.common import run_info

SCHEMA = {"type": "object", "additionalProperties": False,
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "maxLength": 40},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                  "maxItems": 4}},
          "required": ["name", "age", "email", "tags"]}
FIRST = ["Maria", "Kofi", "Aiko", "Lars", "Priya", "Tomás", "Chen", "Amara"]
LAST = ["Lopez", "Mensah", "Tanaka", "Berg", "Nair", "Silva", "Wei", "Okafor"]
HOBBIES = ["hiking", "chess", "jazz", "pottery", "cycling", "baking", "sailing", "go"]


def record(i: int) -> str:
    first, last = FIRST[i % 8], LAST[(3 * i + 1) % 8]
    return (f"{first} {last} is {20 + (7 * i) % 50} years old, writes from "
            f"{first.lower()}.{last.lower()}@example.com and likes {HOBBIES[i % 8]} and "
            f"{HOBBIES[(i + 3) % 8]}.")


def run(llm: LLM, batch: int, max_tokens: int, structured: bool) -> dict:
    convs = [[{"role": "user", "content": "Extract the name, age, email and hobbies (as "
               f"tags) of this person as JSON.\n\n{record(i)}"}] for i in range(batch)]
    so = StructuredOutputs(json=SCHEMA) if structured else None
    params = SamplingParams(max_tokens=max_tokens, temperature=0, structured_outputs=so)
    times0 = dataclasses.replace(llm.engine.step_times)
    start = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
    valid = 0
    for o in outs:
        try:
            valid += isinstance(json.loads(o.outputs[0].text), dict)
        except json.JSONDecodeError:
            pass
    cut = sum(o.outputs[0].finish_reason == "length" for o in outs)
    return {"structured": structured, "output_tokens": n_out, "elapsed_s": round(elapsed, 3),
            "output_tokens_per_s": round(n_out / elapsed, 2), "valid_json": valid,
            "cut_at_max_tokens": cut,
            "step_ms": llm.engine.step_times.since(times0).per_step_ms()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="K",
                   help="also run the constrained requests with K prompt-lookup drafts")
    a = p.parse_args()
    llm = LLM(max_num_seqs=a.batch, kv_cache_memory_gb=0.5)
    run(llm, 2, 8, True)                       # warm-up, and the grammar tokenizer's build
    best: dict[bool, dict] = {}
    for _ in range(a.repeats):
        for structured in (False, True):
            r = run(llm, a.batch, a.max_tokens, structured)
            if structured not in best or r["output_tokens_per_s"] > \
                    best[structured]["output_tokens_per_s"]:
                best[structured] = r
    plain, constrained = best[False], best[True]
    steps = constrained["step_ms"]
    mask_ms = steps["masks"] / max(steps["seqs_per_step"], 1)
    result = {"bench": "structured_outputs", "batch": a.batch, "max_tokens": a.max_tokens,
              "unconstrained": plain, "json_schema": constrained,
              "mask_ms_per_sequence_step": round(mask_ms, 4)}
    if a.speculative_tokens:
        del llm
        spec_llm = LLM(max_num_seqs=a.batch, kv_cache_memory_gb=0.5,
                       speculative_config={"num_speculative_tokens": a.speculative_tokens})
        run(spec_llm, 2, 8, True)
        stats = spec_llm.engine.scheduler.spec_stats
        drafted0, accepted0 = stats.num_draft_tokens, stats.num_accepted_tokens
        spec = max((run(spec_llm, a.batch, a.max_tokens, True) for _ in range(a.repeats)),
                   key=lambda r: r["output_tokens_per_s"])
        spec["acceptance_rate"] = round((stats.num_accepted_tokens - accepted0)
                                        / max(stats.num_draft_tokens - drafted0, 1), 3)
        spec["speedup"] = round(spec["output_tokens_per_s"]
                                / constrained["output_tokens_per_s"], 3)
        result["json_schema_speculative"] = spec
    print(json.dumps({**result, **run_info("cpu")}))


if __name__ == "__main__":
    main()
