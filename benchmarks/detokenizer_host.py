"""The host's time per generated token in incremental detokenization, the one part of output
processing that grows with the tokenizer: a text's tokens pushed one at a time after a chat
prompt, as the engine does for each sampled token. Prints a JSON line: microseconds per token,
the best of the repeats (the machine's noise only ever adds time).

    python benchmarks/detokenizer_host.py --text README.md

Compare two trees by running it alternately against each (PYTHONPATH=the other tree).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from taskloom.bench.common import run_info
from taskloom.models.embedded import embedded_model_path
from taskloom.tokenizer import IncrementalDetokenizer, Tokenizer


def seconds_per_token(tokenizer: Tokenizer, prompt: list[int], ids: list[int]) -> float:
    detok = IncrementalDetokenizer(tokenizer, prompt)
    start = time.perf_counter()
    for token_id in ids:
        detok.push([token_id])
    detok.flush()
    return (time.perf_counter() - start) / len(ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", default="README.md", help="a UTF-8 text file to tokenize")
    p.add_argument("--max-chars", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    tokenizer = Tokenizer.from_gguf(embedded_model_path())
    with open(a.text, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read()[:a.max_chars], add_special_tokens=False)
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Say something."}])
    best = min(seconds_per_token(tokenizer, prompt, ids) for _ in range(a.repeats))
    print(json.dumps({"bench": "detokenizer_host", "tokens": len(ids),
                      "us_per_token": round(best * 1e6, 2), **run_info("cpu"),
                      "command": " ".join(["python benchmarks/detokenizer_host.py"]
                                          + sys.argv[1:])}))


if __name__ == "__main__":
    main()
