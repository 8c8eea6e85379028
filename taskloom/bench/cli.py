"""`taskloom bench` subcommands and their flags."""
from __future__ import annotations

import argparse
import json


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    from taskloom.cli import add_engine_args
    bench = sub.add_parser("bench", help="benchmarks; the last line printed is JSON")
    kinds = bench.add_subparsers(dest="bench", required=True)
    tp = kinds.add_parser("throughput", help="offline throughput over many requests")
    add_engine_args(tp)
    tp.add_argument("--num-prompts", type=int, default=64)
    tp.add_argument("--input-len", type=int, default=128)
    tp.add_argument("--output-len", type=int, default=128)
    tp.add_argument("--input-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None,
                    help="draw each input length uniformly from [LO, HI] instead")
    tp.add_argument("--dataset-seed", type=int, default=0)
    tp.add_argument("--peer", choices=["hf"], default=None,
                    help="run the same workload through HF transformers generate and compare")
    tp.add_argument("--peer-batch-size", type=int, default=None,
                    help="batch size of the HF generate calls (default: --max-num-seqs)")
    tp.add_argument("--output-json", default=None, help="also write the result to this file")
    tp.set_defaults(func=_run_throughput)


def _run_throughput(a: argparse.Namespace) -> int:
    from taskloom.bench.throughput import run_throughput
    result = run_throughput(a)
    line = json.dumps(result)
    if a.output_json:
        with open(a.output_json, "w") as f:
            f.write(line + "\n")
    print(line)
    return 0
