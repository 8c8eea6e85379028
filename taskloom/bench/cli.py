"""`taskloom bench` subcommands and their flags."""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable


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
    tp.add_argument("--shared-prefix", type=int, default=0, metavar="LEN",
                    help="every prompt starts with the same LEN random tokens")
    tp.add_argument("--num-prefixes", type=int, default=1,
                    help="that many different shared prefixes, interleaved across prompts")
    tp.add_argument("--unique", dest="unique_len", type=int, default=None, metavar="LEN",
                    help="then LEN tokens of its own (default: --input-len)")
    tp.add_argument("--turns", type=int, default=1,
                    help="multi-turn chat: each later turn resends the history plus "
                         "--user-len new tokens")
    tp.add_argument("--user-len", type=int, default=None,
                    help="new user tokens per later turn (default: --input-len)")
    tp.add_argument("--dataset-seed", type=int, default=0)
    tp.add_argument("--peer", choices=["hf", "hf-static"], default=None,
                    help="run the same workload through HF transformers and compare: hf is "
                         "generate_batch (continuous batching, SDPA over a paged cache), "
                         "hf-static is generate over static batches of --peer-batch-size")
    tp.add_argument("--peer-num-prompts", type=int, default=None, metavar="N",
                    help="give the peer a workload of N prompts of the same distribution "
                         "(new ones), which taskloom also runs, after the main run: the ratio "
                         "compares that workload (for a peer too slow for the whole)")
    tp.add_argument("--peer-batch-size", type=int, default=None,
                    help="batch size of the hf-static generate calls (default: --max-num-seqs)")
    _add_profile_args(tp)
    tp.add_argument("--profile-warmup-steps", type=int, default=None, metavar="N",
                    help="steps of the profiled workload before its window (default: into "
                         "the steady state, where finishing requests make room for new "
                         "ones, or all decode)")
    tp.add_argument("--output-json", default=None, help="also write the result to this file")
    tp.set_defaults(func=_auto_dtype(_run_throughput))
    lat = kinds.add_parser("latency", help="batch latency: TTFT and decode tokens/s, GB/s")
    add_engine_args(lat)
    lat.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--dataset-seed", type=int, default=0)
    lat.add_argument("--peer", choices=["hf", "llama.cpp"], default=None,
                     help="run the same batches through a peer and compare: hf is HF "
                          "transformers generate; llama.cpp (CPU, a GGUF model) is its "
                          "llama-batched-bench")
    lat.add_argument("--llama-cpp-dir", default=None, metavar="DIR",
                     help="the folder of llama.cpp's programs (default: found on PATH)")
    lat.add_argument("--peer-weights", choices=["dtype", "file"], default="dtype",
                     help="what llama.cpp runs: the GGUF's weights in --dtype, the bytes "
                          "taskloom reads (dtype), or the file as stored, quantized tensors "
                          "and all (file)")
    _add_profile_args(lat)
    lat.add_argument("--output-json", default=None, help="also write the result to this file")
    lat.set_defaults(func=_auto_dtype(_run_latency))
    lo = kinds.add_parser("lora", help="multi-LoRA throughput relative to the base model")
    add_engine_args(lo)
    lo.add_argument("--num-loras", type=int, nargs="+", default=[1, 8, 64],
                    help="numbers of distinct adapters to run the workload with")
    lo.add_argument("--lora-rank", type=int, default=16)
    lo.add_argument("--lora-files", type=int, default=8,
                    help="distinct random weight files the adapters are loaded from, adapter i "
                         "from file i mod this (each is still loaded, cached and slotted under "
                         "its own id); 512 distinct rank-16 files of the Llama-8B shape would "
                         "take 43 GB of disk")
    lo.add_argument("--num-prompts", type=int, default=64)
    lo.add_argument("--input-len", type=int, default=128)
    lo.add_argument("--output-len", type=int, default=64)
    lo.add_argument("--input-len-range", type=int, nargs=2, metavar=("LO", "HI"), default=None)
    lo.add_argument("--dataset-seed", type=int, default=0)
    lo.add_argument("--repeats", type=int, default=2,
                    help="run every configuration this many times, round-robin; keep the best")
    lo.add_argument("--output-json", default=None, help="also write the result to this file")
    lo.set_defaults(func=_auto_dtype(_run_lora), max_loras=None)
    sv = kinds.add_parser("serve", help="online latency and throughput against a running server")
    sv.add_argument("--base-url", default="http://127.0.0.1:8000")
    sv.add_argument("--model", default=None, help="model name (default: the server's first)")
    sv.add_argument("--api-key", default=None)
    sv.add_argument("--num-prompts", type=int, default=100)
    sv.add_argument("--request-rate", type=float, default=float("inf"),
                    help="mean arrivals per second, Poisson (default: all at once)")
    sv.add_argument("--max-concurrency", type=int, default=None,
                    help="at most this many requests in flight")
    sv.add_argument("--input-len", type=int, default=128)
    sv.add_argument("--output-len", type=int, default=128)
    sv.add_argument("--seed", type=int, default=0)
    sv.add_argument("--token-ids", action="store_true",
                    help="send prompts of random token ids (in [100, 1000)) and count tokens by "
                         "the token_ids the server returns (return_token_ids): for a server "
                         "without a tokenizer (--random-weights with a named shape)")
    sv.add_argument("--output-json", default=None, help="also write the result to this file")
    sv.set_defaults(func=_run_serve)
    kn = kinds.add_parser("kernels", help="each op of a decoder layer alone at a model's "
                                          "shapes: time, GB/s or TFLOP/s, error vs torch")
    kn.add_argument("--model", default="llama-3.1-8b",
                    help="a named shape or a config.json (weights are random)")
    kn.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    kn.add_argument("--device", default="cuda")
    kn.add_argument("--ops", choices=["auto", "torch", "triton"], default="auto",
                    help="auto: the Triton kernels on CUDA, the torch references elsewhere; "
                         "triton on a CPU needs TRITON_INTERPRET=1")
    kn.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256],
                    help="decode batches: one token per sequence")
    kn.add_argument("--context-lens", type=int, nargs="+", default=[512, 2048],
                    help="tokens each sequence of a decode batch attends to")
    kn.add_argument("--prefill-tokens", type=int, nargs="+", default=[8192])
    kn.add_argument("--prompt-len", type=int, default=1024,
                    help="tokens of each prompt in the prefill chunk (extend attention)")
    kn.add_argument("--max-model-len", type=int, default=4096,
                    help="what CUDA graphs are captured for: fixes their decode splits")
    kn.add_argument("--block-size", type=int, default=16)
    kn.add_argument("--repeats", type=int, default=5, help="timed calls per case on a CPU")
    kn.add_argument("--sweep", action="store_true",
                    help="also time the attention kernels at other launch settings (keys "
                         "per tile, warps, pipeline stages)")
    kn.add_argument("--sweep-budget", type=float, default=120.0, metavar="SECONDS",
                    help="stop sweeping after this long (compiling the settings takes most "
                         "of it); what was timed is kept")
    kn.add_argument("--output-json", default=None, help="also write the result to this file")
    kn.set_defaults(func=_run_kernels)
    wi = kinds.add_parser("window", help="KV compression: perplexity and KV memory of "
                                         "sliding windows with sinks vs full attention")
    add_engine_args(wi)
    wi.add_argument("--windows", type=int, nargs="+", default=[256],
                    help="sliding-window sizes to score")
    wi.add_argument("--sinks", type=int, nargs="+", default=[0, 4],
                    help="attention-sink counts to score each window with")
    wi.add_argument("--context-len", type=int, default=2048, help="tokens per passage")
    wi.add_argument("--num-texts", type=int, default=4, help="passages, scored in one batch")
    wi.add_argument("--text-file", default=None, metavar="FILE",
                    help="a UTF-8 text to cut the passages from (default: Python's "
                         "reference documentation, pydoc_data.topics)")
    wi.add_argument("--output-json", default=None, help="also write the result to this file")
    wi.set_defaults(func=_auto_dtype(_run_window))
    sn = kinds.add_parser("snapkv", help="KV compression of long prompts: needle retrieval "
                                         "and KV memory of SnapKV vs full attention and a "
                                         "sliding window of the same size")
    add_engine_args(sn)
    sn.add_argument("--budgets", type=int, nargs="+", default=[128, 256],
                    help="SnapKV budgets to run (KV entries kept a prompt)")
    sn.add_argument("--kernel-sizes", type=int, nargs="+", default=[7, 13],
                    help="pooling widths to run each budget with (odd)")
    sn.add_argument("--context-len", type=int, default=1024, help="tokens per prompt")
    sn.add_argument("--num-prompts", type=int, default=8, help="prompts, answered in one batch")
    sn.add_argument("--max-tokens", type=int, default=8, help="tokens of each answer")
    sn.add_argument("--needle-seed", dest="seed", type=int, default=0,
                    help="seed of the needles' codes and depths")
    sn.add_argument("--no-window-baseline", dest="window_baseline", action="store_false",
                    help="skip the sliding windows of each budget's size")
    sn.add_argument("--text-file", default=None, metavar="FILE",
                    help="a UTF-8 text to cut the passages from (default: Python's "
                         "reference documentation, pydoc_data.topics)")
    sn.add_argument("--output-json", default=None, help="also write the result to this file")
    sn.set_defaults(func=_auto_dtype(_run_snapkv))
    sp = kinds.add_parser("spec", help="speculative decoding (prompt lookup, Medusa or Hydra "
                                       "heads) against the same engine without it")
    add_engine_args(sp)
    sp.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    sp.add_argument("--output-len", type=int, default=128,
                    help="new tokens at most per request (requests also end at EOS)")
    sp.add_argument("--temperature", type=float, default=0.0)
    sp.add_argument("--seed", type=int, default=None, help="sampling seed (with --temperature)")
    sp.add_argument("--workload", choices=["code-edit", "topics"], default="code-edit",
                    help="built-in prompts: code editing of standard-library functions (their "
                         "answers repeat the prompt), or questions on Python's reference "
                         "topics, the held-out half of train-medusa's default")
    sp.add_argument("--prompts-file", default=None, metavar="JSONL",
                    help='your own prompts, a {"prompt": ...} or {"messages": [...]} per line '
                         "(instead of --workload)")
    sp.add_argument("--repeats", type=int, default=2,
                    help="alternating runs with and without drafts; each keeps its fastest")
    sp.add_argument("--peer", choices=["hf"], default=None,
                    help="also HF generate with its prompt lookup (greedy, batch 1)")
    sp.add_argument("--peer-num-prompts", type=int, default=4, metavar="N")
    sp.add_argument("--output-json", default=None, help="also write the result to this file")
    sp.set_defaults(func=_auto_dtype(_run_spec))
    sm = kinds.add_parser("summary", help="a line per result of a results file (JSON lines), "
                                          "and speedups between results of one workload")
    sm.add_argument("results", help="a file of benchmark JSON lines, e.g. run_gpu.sh's")
    sm.set_defaults(func=_run_summary)


def _add_profile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", action="store_true",
                   help="after the timed run, profile a window of steps of the same workload "
                        "(torch.profiler) and add where the time went to the result: device "
                        "kernels by category and name, and how busy the device was")
    p.add_argument("--profile-steps", type=int, default=16, metavar="N",
                   help="steps in the profiled window")
    p.add_argument("--profile-dir", default=None, metavar="DIR",
                   help="also keep each window's Chrome trace (for Perfetto) in DIR")


def _auto_dtype(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` with `--dtype auto` resolved first, so that the result names the dtype that ran
    (and a peer runs in it too)."""
    def call(a: argparse.Namespace) -> int:
        from taskloom.runtime.dtypes import resolve_dtype
        a.dtype = resolve_dtype(a.dtype, a.device)
        return run(a)
    return call


def _run_throughput(a: argparse.Namespace) -> int:
    from taskloom.bench.throughput import run_throughput
    return _emit(run_throughput(a), a.output_json)


def _run_latency(a: argparse.Namespace) -> int:
    from taskloom.bench.latency import run_latency
    result = run_latency(a)
    for r in result["results"]:
        print(f"batch {r['batch_size']:4d}: TTFT {r['ttft_ms']:9.1f} ms "
              f"({r['prefill_tflops']:.2f} TFLOP/s, "
              f"{100 * r['fraction_of_matmul_flops']:.0f}% of matmul)  decode "
              f"{r['decode_tokens_per_s']:9.1f} tok/s  {r['achieved_gb_per_s']:8.1f} GB/s "
              f"({100 * r['fraction_of_copy_bandwidth']:.0f}% of copy)")
    return _emit(result, a.output_json)


def _run_kernels(a: argparse.Namespace) -> int:
    from taskloom.bench.kernels import run_kernels
    from taskloom.bench.summary import result_lines
    result = run_kernels(a)
    print("\n".join(result_lines(result)))
    return _emit(result, a.output_json)


def _run_lora(a: argparse.Namespace) -> int:
    from taskloom.bench.lora import run_lora_bench
    result = run_lora_bench(a)
    print(f"base: {result['base']['output_tokens_per_s']:9.1f} output tok/s")
    for r in result["results"]:
        print(f"{r['num_loras']:5d} adapters: {r['output_tokens_per_s']:9.1f} output tok/s "
              f"({r['ratio_vs_base']:.3f} of base, {r['slot_writes']} slot writes)")
    return _emit(result, a.output_json)


def _run_serve(a: argparse.Namespace) -> int:
    from taskloom.bench.serve import run_serve_bench
    result = run_serve_bench(a)
    for key in ("ttft", "itl", "e2e"):
        p = result[key]
        print(f"{key:>5}: mean {p['mean_ms']:9.1f} ms  p50 {p['p50_ms']:9.1f}  "
              f"p90 {p['p90_ms']:9.1f}  p99 {p['p99_ms']:9.1f}")
    print(f"{result['completed']}/{result['num_prompts']} requests in {result['duration_s']} s: "
          f"{result['output_tokens_per_s']} output tok/s")
    return _emit(result, a.output_json)


def _run_window(a: argparse.Namespace) -> int:
    from taskloom.bench.window import run_window
    _need_real_weights(a, "bench window scores real text")
    return _print_and_emit(run_window(a), a.output_json)


def _run_snapkv(a: argparse.Namespace) -> int:
    from taskloom.bench.snapkv import run_snapkv
    _need_real_weights(a, "bench snapkv answers questions on real text")
    return _print_and_emit(run_snapkv(a), a.output_json)


def _run_spec(a: argparse.Namespace) -> int:
    from taskloom.bench.spec import run_spec
    return _print_and_emit(run_spec(a), a.output_json)


def _need_real_weights(a: argparse.Namespace, what: str) -> None:
    if a.random_weights:
        raise ValueError(f"{what}: it needs real weights and a tokenizer, not "
                         f"--random-weights")


def _print_and_emit(result: dict, output_json: str | None) -> int:
    """The result's summary lines, then its JSON line (and file)."""
    from taskloom.bench.summary import result_lines
    print("\n".join(result_lines(result)))
    return _emit(result, output_json)


def _run_summary(a: argparse.Namespace) -> int:
    from taskloom.bench.summary import summarize_file
    print(summarize_file(a.results))
    return 0


def _emit(result: dict, output_json: str | None) -> int:
    from taskloom.bench.common import write_json
    write_json(output_json, result)
    print(json.dumps(result))
    return 0
