"""How often a model run one way decodes greedily what it decodes run another way: each
configuration named (`float32`, `bfloat16`, `int4` = bfloat16 with `quantization="gguf"`)
against the first, over prompts cut from Python's own help topics (`pydoc_data`, in every
Python). Prints a JSON line: per configuration, the fraction of sequences identical to the
reference's and the mean fraction of tokens before the first difference.

    python benchmarks/greedy_agreement.py --configs float32 bfloat16 int4 --num-prompts 50 \
        --max-tokens 64
"""
from __future__ import annotations

import argparse
import json

from pydoc_data.topics import topics

from taskloom import LLM, SamplingParams
from taskloom.bench.common import run_info

CONFIGS = {"float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"},
           "int4": {"dtype": "bfloat16", "quantization": "gguf"}}


def prompts(n: int, words: int = 48) -> list[str]:
    """The first `words` words of each of n help topics (sorted by name) as a chat turn."""
    texts = [" ".join(topics[k].split()[:words]) for k in sorted(topics)]
    return [f"Explain this in your own words: {t}" for t in texts[:n]]


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, float]:
    """Identical sequences and the mean agreeing prefix (fraction of the reference's length)."""
    prefixes = []
    for a, b in zip(ref, got):
        same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefixes.append(same / max(len(a), 1))
    return {"identical": round(sum(a == b for a, b in zip(ref, got)) / len(ref), 3),
            "mean_agreeing_prefix": round(sum(prefixes) / len(prefixes), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS),
                   default=["float32", "bfloat16", "int4"], help="the first is the reference")
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args()
    params = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True)
    chats = [[{"role": "user", "content": text}] for text in prompts(a.num_prompts)]
    outputs = {}
    for name in a.configs:
        llm = LLM(a.model, **CONFIGS[name])
        outputs[name] = [o.outputs[0].token_ids for o in llm.chat(chats, params, use_tqdm=False)]
        del llm
    ref = a.configs[0]
    print(json.dumps({"bench": "greedy_agreement", "model": a.model or "embedded",
                      "reference": ref, "num_prompts": len(chats), "max_tokens": a.max_tokens,
                      "results": {n: agreement(outputs[ref], outputs[n])
                                  for n in a.configs[1:]}, **run_info("cpu")}))


if __name__ == "__main__":
    main()
