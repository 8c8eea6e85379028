"""The `taskloom` command: generate | chat | serve | batch | train-medusa | train-hydra |
draft-tree | bench.

`generate` streams one completion to the terminal; `chat` is an interactive multi-turn REPL
that streams (/reset, /exit); `serve` runs the OpenAI-compatible server with its chat page;
`batch` answers a file of OpenAI batch requests into an output file, resumably;
`train-medusa` and `train-hydra` train draft heads for the model on its own answers;
`draft-tree` measures trained heads and finds the token trees to draft with; `bench` runs
the benchmarks and prints a JSON line last.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence

from taskloom.config import SnapKVConfig
from taskloom.sampling_params import SamplingParams
from taskloom.server.tool_parsers import TOOL_CALL_PARSERS, tool_call_parser_named


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags that choose the model and size the engine (shared by every subcommand)."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None,
                   help="HF directory or .gguf file (default: embedded SmolLM2-135M-Instruct); "
                        "with --random-weights a shape name or config.json")
    g.add_argument("--random-weights", action="store_true",
                   help="random weights of the named shape, nothing read from disk")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bf16 on a GPU (fp16 where it has no bf16) and on a CPU with "
                        "AVX512-BF16 or AMX, else float32 (the reference)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--quantization", choices=["gguf"], default=None,
                   help="gguf: keep a GGUF file's 4-bit projections (Q4_0, Q4_1, Q4_K) 4-bit "
                        "on a CPU in bf16: a quarter of their memory, faster decoding of one "
                        "to a few streams, slower of many (default: dequantize every weight)")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--kv-cache-memory-gb", type=float, default=1.0)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--weights-seed", type=int, default=0, help="seed of --random-weights")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step eagerly (no CUDA graphs for decode steps on CUDA, no "
                        "replayed C kernel calls on the CPU)")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="compute every prompt in full (no reuse of cached KV blocks)")
    g.add_argument("--no-prefix-aware-order", dest="prefix_aware_order", action="store_false",
                   help="admit a known batch in input order, not grouped by shared prefix")
    g.add_argument("--async-scheduling", action="store_true",
                   help="schedule each step while the previous one runs on the device "
                        "(hides the host's time per step on a GPU)")
    g.add_argument("--no-shared-prefix-attention", dest="shared_prefix_attention",
                   action="store_false",
                   help="every decode attends to its whole context alone, even where "
                        "several share cached prefix blocks")
    g.add_argument("--sliding-window", type=int, default=None, metavar="N",
                   help="KV compression: each token attends to the last N positions (and the "
                        "sinks); blocks behind every window go back to the pool (default: "
                        "the model's own window, if any)")
    g.add_argument("--attention-sinks", dest="num_sink_tokens", type=int, default=0,
                   metavar="N", help="with --sliding-window, the first N tokens stay "
                                     "visible to every query (StreamingLLM)")
    g.add_argument("--snapkv-budget", type=int, default=None, metavar="N",
                   help="KV compression of long prompts (SnapKV): a prompt of more than N "
                        "tokens keeps, per layer and KV head, the N positions its last "
                        "tokens attend to most (its observation window included)")
    g.add_argument("--snapkv-window", type=int, default=32, metavar="N",
                   help="with --snapkv-budget: the prompt's last N tokens vote and are kept")
    g.add_argument("--snapkv-kernel-size", type=int, default=7, metavar="N",
                   help="with --snapkv-budget: pooling width over the votes (odd)")
    g.add_argument("--snapkv-pooling", choices=("avg", "max"), default="max",
                   help="with --snapkv-budget: how the votes are pooled")
    g.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='speculative decoding by prompt lookup, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_max": 4}\', or by '
                        'draft heads, \'{"method": "medusa", "model": DIR, '
                        '"num_speculative_tokens": 3}\' (or "hydra"; vLLM\'s keys; outputs '
                        'are unchanged)')
    g = p.add_argument_group("LoRA adapters")
    g.add_argument("--lora", action="append", default=[], metavar="NAME=PATH",
                   type=_lora_arg, help="serve the PEFT adapter at PATH as NAME (repeatable)")
    g.add_argument("--enable-lora", action="store_true",
                   help="serve adapters even with none named at start (load them later)")
    g.add_argument("--max-loras", type=int, default=8,
                   help="adapters in one batch at most (device slots)")
    g.add_argument("--max-lora-rank", type=int, default=16)
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory (default: 4 x --max-loras)")


def _json_object(value: str) -> dict:
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {value!r}") from None
    if not isinstance(obj, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
    return obj


def _lora_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {value!r}")
    return name, path


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=temperature)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible)")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")


def sampling_params_from_args(a: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=a.max_tokens, min_tokens=a.min_tokens, temperature=a.temperature,
        top_p=a.top_p, top_k=a.top_k, min_p=a.min_p, repetition_penalty=a.repetition_penalty,
        presence_penalty=a.presence_penalty, frequency_penalty=a.frequency_penalty,
        seed=a.seed, stop=a.stop, ignore_eos=a.ignore_eos)


# Set by `run` (the `taskloom` command itself, not a caller of `main` in its own process):
# freeze the heap once the command's engine is built (see make_llm).
_FREEZE_HEAP_AFTER_BUILD = False


def make_llm(a: argparse.Namespace):  # -> taskloom.api.LLM (imported late: it loads torch)
    """The command's engine. In a `taskloom` process, everything alive once it is built (torch,
    the model's modules, the tokenizer) moves into the garbage collector's permanent
    generation, as vLLM's engine core does after start-up: CPython's oldest-generation
    collections walk every tracked object, and over the half-million a loaded process holds
    one took 70-160 ms here, a stall of whole steps every few hundred steps of a full batch
    (benchmarks/engine_host.py, without and with --freeze). Frozen, they take a few ms."""
    from taskloom.api import LLM
    names = [name for name, _ in a.lora]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"--lora names {', '.join(twice)} more than once")
    llm = LLM(a.model, dtype=a.dtype, device=a.device, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens,
              kv_cache_memory_gb=a.kv_cache_memory_gb, block_size=a.block_size,
              gpu_memory_utilization=a.gpu_memory_utilization,
              max_model_len=a.max_model_len, random_weights=a.random_weights, seed=a.weights_seed,
              enforce_eager=a.enforce_eager, enable_prefix_caching=a.enable_prefix_caching,
              prefix_aware_order=a.prefix_aware_order, async_scheduling=a.async_scheduling,
              shared_prefix_attention=a.shared_prefix_attention, enable_lora=a.enable_lora,
              loras=dict(a.lora), max_loras=a.max_loras, max_lora_rank=a.max_lora_rank,
              max_cpu_loras=a.max_cpu_loras, speculative_config=a.speculative_config,
              sliding_window=a.sliding_window, num_sink_tokens=a.num_sink_tokens,
              snapkv=snapkv_config(a), quantization=a.quantization)
    if _FREEZE_HEAP_AFTER_BUILD:
        gc.collect()
        gc.freeze()
    return llm


def snapkv_config(a: argparse.Namespace) -> SnapKVConfig | None:
    """The SnapKV settings of the command line (None without --snapkv-budget)."""
    budget = getattr(a, "snapkv_budget", None)
    if budget is None:
        return None
    return SnapKVConfig(budget, window_size=a.snapkv_window, kernel_size=a.snapkv_kernel_size,
                        pooling=a.snapkv_pooling)


def cmd_generate(a: argparse.Namespace) -> int:
    params = sampling_params_from_args(a)
    llm = make_llm(a)
    prompt = llm.encode_chat([{"role": "user", "content": a.prompt}]) if a.chat else a.prompt
    final = None
    for out in llm.stream(prompt, params):
        print(out.outputs[0].text_delta, end="", flush=True)
        final = out
    print()
    if final is not None and a.verbose:
        c = final.outputs[0]
        print(f"[{len(c.token_ids)} tokens, finish_reason={c.finish_reason}]", file=sys.stderr)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    params = sampling_params_from_args(a)
    llm = make_llm(a)
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    print("taskloom chat: type a message; /reset starts over, /exit quits.")
    while True:
        try:
            line = input("\n> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if a.system else []
            print("(conversation reset)")
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        reply = ""
        try:
            for out in llm.stream(llm.encode_chat(history), params):
                print(out.outputs[0].text_delta, end="", flush=True)
                reply = out.outputs[0].text
        except KeyboardInterrupt:
            print(" [stopped]")
        print()
        history.append({"role": "assistant", "content": reply})


def default_model_name(a: argparse.Namespace) -> str:
    """The name clients use in `model`: the file or directory name, or the shape's name."""
    if a.model is None:
        from taskloom.models.embedded import EMBEDDED_NAME
        return EMBEDDED_NAME
    base = os.path.basename(os.path.normpath(a.model))
    return base.removesuffix(".gguf").removesuffix(".json") or a.model


def cmd_serve(a: argparse.Namespace) -> int:
    from taskloom.server.launch import serve, uvicorn_config
    if a.max_queue is not None and a.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {a.max_queue}")
    if a.reserved_cpus is not None and a.reserved_cpus < 0:
        raise ValueError(f"--reserved-cpus must be >= 0, got {a.reserved_cpus}")
    client = served_engine(a)
    try:
        name = a.served_model_name or default_model_name(a)
        config = uvicorn_config(client, name, a.host, a.port, a.api_key, a.max_queue,
                                a.shutdown_timeout, tool_call_parser=a.tool_call_parser)
        url = f"http://{a.host}:{a.port}"
        runs_on = f" ({client.info.runs_on})" if client.info.runs_on else ""
        print(f"taskloom: serving {name!r}{runs_on} at {url}/v1 (OpenAI API)\n"
              f"taskloom: chat page at {url}/  (Ctrl-C stops)", flush=True)
        serve(config)
    finally:
        client.stop()       # where the app's lifespan has not (a port already in use)
    return 0


def served_engine(a: argparse.Namespace):  # -> taskloom.engine.client.EngineClient
    """The engine `serve` talks to: built in a process of its own (--engine-process, the
    default; see taskloom.engine.core_process) or in this one, stepping in a thread."""
    if not a.engine_process:
        from taskloom.engine.client import AsyncEngineClient
        llm = make_llm(a)
        return AsyncEngineClient(llm.engine, llm.loras if llm.config.lora.enabled else None)
    from taskloom.engine.core_process import ProcessEngineClient
    client = ProcessEngineClient.launch(functools.partial(build_served_engine, a),
                                        log_level=a.log_level.upper())
    if _FREEZE_HEAP_AFTER_BUILD:    # the tokenizer and the app's modules, as make_llm does
        gc.collect()
        gc.freeze()
    return client


def build_served_engine(a: argparse.Namespace):  # -> (EngineCore, LoRARegistry | None)
    """In the engine's process: the engine of `serve`, its heap frozen once built (it is a
    process of its own, as a `taskloom` command's is). On a CPU, torch's threads there leave
    --reserved-cpus cores to the server's process (as vLLM's CPU backend does), unless
    OMP_NUM_THREADS says how many to use."""
    global _FREEZE_HEAP_AFTER_BUILD
    _FREEZE_HEAP_AFTER_BUILD = True
    threads = engine_cpu_threads(a.device, a.reserved_cpus, os.environ.get("OMP_NUM_THREADS"),
                                 len(os.sched_getaffinity(0)))
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
        logging.getLogger(__name__).info("engine process: %d CPU threads", threads)
    llm = make_llm(a)
    return llm.engine, (llm.loras if llm.config.lora.enabled else None)


# Cores from which a CPU engine leaves one to the server's process by default. Engine threads
# on every core take time from the event loop that streams their tokens (a host-bound tiny
# model streamed 1.06-1.20x faster on 2 cores with one reserved: benchmarks/serve_host.py),
# but a real model needs the cores: the embedded one served 1.3-1.7x more tokens/s on 2 cores
# with none reserved (bf16 and fp32, 8 and 32 concurrent streams, `taskloom bench serve`).
# Reserving costs 1/cores of the model's compute; from 8 cores on it is the smaller cost.
RESERVE_A_CPU_FROM = 8


def engine_cpu_threads(device: str, reserved: int | None, omp_num_threads: str | None,
                       num_cpus: int) -> int | None:
    """torch's threads in a CPU engine's own process: the cores it may run on less `reserved`
    for the server's process (at least one; None: one from RESERVE_A_CPU_FROM cores on, else
    none); None (torch's default) on a GPU or where OMP_NUM_THREADS is set."""
    if not device.startswith("cpu") or omp_num_threads:
        return None
    if reserved is None:
        reserved = 1 if num_cpus >= RESERVE_A_CPU_FROM else 0
    return max(1, num_cpus - reserved)


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with a chat page")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TASKLOOM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on /v1/* (default: "
                        "$TASKLOOM_API_KEY; never logged)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="refuse new requests (429) when this many sequences are waiting")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send (default: the model's file name)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="run the engine core in a process of its own, so the HTTP side "
                        "never takes the interpreter lock from it (--no-engine-process: in "
                        "a thread of the server's process)")
    p.add_argument("--reserved-cpus", type=int, default=None,
                   help="with the engine on the CPU in its own process: cores left to the "
                        "server's process (torch's threads are the rest; default: 1 on 8 or "
                        "more cores, else 0; OMP_NUM_THREADS, if set, decides instead)")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default=None,
                   help='find the tool calls the model writes in its own format, for '
                        'tool_choice "auto" (hermes: Hermes, Qwen2.5, Qwen3; llama3_json: '
                        'Llama 3.1-3.3; mistral: Mistral)')
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)


@contextlib.contextmanager
def _stop_on_signals(stop: Callable[[int], None]) -> Iterator[None]:
    """While inside, SIGINT (Ctrl-C) and SIGTERM call `stop(signum)` instead of killing the
    process; a second Ctrl-C raises KeyboardInterrupt at once."""
    def handler(signum: int, _frame: object) -> None:
        stop(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cmd_batch(a: argparse.Namespace) -> int:
    from taskloom.batch import BatchJob
    if a.max_in_flight is not None and a.max_in_flight < 1:
        raise ValueError(f"--max-in-flight must be >= 1, got {a.max_in_flight}")
    job = BatchJob(a.input, a.output)           # checks both files before the model loads
    signals: list[int] = []

    def stop(signum: int) -> None:
        signals.append(signum)
        job.request_stop()

    with _stop_on_signals(stop):
        try:
            job.run(make_llm(a), a.served_model_name or default_model_name(a), a.max_in_flight,
                    tool_call_parser=tool_call_parser_named(a.tool_call_parser))
        except KeyboardInterrupt:               # a second Ctrl-C: run() cleaned up already
            job.summary.interrupted = True
    s = job.summary
    print(f"taskloom batch: {s.done} lines written ({s.errors} errors), {s.skipped} skipped "
          f"as already in {a.output}, in {s.elapsed:.1f} s, {s.tokens_per_s:.1f} output "
          f"tokens/s", flush=True)
    if not s.interrupted:
        return 0
    print(f"taskloom batch: interrupted with {job.num_answered} of {job.total} lines answered "
          f"in {a.output}; the requests in flight were dropped. Run the same command again "
          f"to resume: it skips the lines already answered.", file=sys.stderr)
    return 128 + (signals[0] if signals else signal.SIGINT)


def add_batch_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "batch", help="answer a JSONL file of OpenAI batch requests (resumable)",
        description="Answer each line of INPUT, an OpenAI Batch API request "
                    "({custom_id, method, url, body}; url /v1/completions or "
                    "/v1/chat/completions), appending OpenAI batch output lines to OUTPUT as "
                    "requests finish. body.model is required but any name is accepted. Rerun "
                    "the same command after an interruption: lines already in OUTPUT are "
                    "skipped.")
    p.add_argument("input", help="JSONL file of batch requests")
    p.add_argument("output", help="JSONL file the results are appended to (created if missing)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name written in each response (default: the model's file "
                        "name)")
    p.add_argument("--max-in-flight", type=int, default=None,
                   help="sequences in the engine at once (default: 4 x --max-num-seqs)")
    p.add_argument("--tool-call-parser", choices=sorted(TOOL_CALL_PARSERS), default=None,
                   help='find the tool calls the model writes in its own format, for '
                        'tool_choice "auto", as serve does')
    add_engine_args(p)
    p.set_defaults(func=cmd_batch)


def _training_prompts(a: argparse.Namespace, llm) -> list[list[int]]:
    """The token ids of --prompts-file's prompts, or of the built-in questions on Python's
    reference topics (their training half)."""
    from taskloom.models.draft_train import read_prompts
    if a.prompts_file:
        return read_prompts(a.prompts_file, llm)
    from taskloom.bench.spec import topic_conversations
    return [llm.encode_chat(c) for c in topic_conversations("train")]


def cmd_train_heads(a: argparse.Namespace) -> int:
    from taskloom.models.draft_train import DraftTrainConfig, train_draft_heads
    cfg = DraftTrainConfig(method=a.method, num_heads=a.num_heads, num_layers=a.num_layers,
                           max_tokens=a.max_tokens, epochs=a.epochs, lr=a.lr,
                           batch_tokens=a.batch_tokens, seed=a.seed, loss=a.loss,
                           draft_vocab_size=a.draft_vocab_size,
                           samples_per_prompt=a.samples_per_prompt,
                           temperature=a.answer_temperature)
    llm = make_llm(a)
    prompts = _training_prompts(a, llm)
    from taskloom.bench.common import run_info
    result = train_draft_heads(llm, prompts[:a.num_prompts], cfg, a.output)
    print(json.dumps({"train": a.method, **result, **run_info(a.device)}))
    return 0


TRAIN_HEADS_HELP = {
    "medusa": ("train Medusa draft heads for a model on its own answers",
               "Self-distillation (Medusa-1): the model answers the prompts greedily, and "
               "heads learn to guess its next tokens from its last hidden state, the model "
               "frozen. The heads (vLLM's Medusa layout, using the model's own lm head)"),
    "hydra": ("train Hydra draft heads for a model on its own answers",
              "Self-distillation, as for Medusa heads: the model answers the prompts "
              "greedily, and heads learn to guess its next tokens from its last hidden state "
              "and the tokens before the one each guesses (Hydra's sequentially dependent "
              "heads), the model frozen. The heads (Hydra's layout, using the model's own lm "
              "head)"),
}


def cmd_draft_tree(a: argparse.Namespace) -> int:
    from taskloom.engine.draft_tree import best_tree, expected_kept
    from taskloom.models.draft_train import (final_hidden_states, rank_accuracy, self_distill,
                                             training_pairs)
    from taskloom.models.draft_heads import load_draft_heads
    spec = a.speculative_config or {}
    if spec.get("method") not in ("medusa", "hydra") or not spec.get("model"):
        raise SystemExit('draft-tree needs --speculative-config naming draft heads: '
                         '{"method": "medusa" or "hydra", "model": DIR}')
    llm = make_llm(argparse.Namespace(**{**vars(a), "speculative_config": None}))
    model = llm.engine.runner.model
    embed = model.model.embed_tokens.weight
    heads = load_draft_heads(spec["method"], spec["model"], model.config, embed,
                             model.lm_head_weight(), embed.dtype, embed.device)
    prompts = _training_prompts(a, llm)[a.skip_prompts:][:a.num_prompts]
    if not prompts:
        raise SystemExit(f"no prompts left after --skip-prompts {a.skip_prompts}")
    runner = llm.engine.runner
    seqs = self_distill(llm, prompts, a.max_tokens)
    hiddens = final_hidden_states(runner.model, [s for s, _ in seqs], runner.block_size)
    states, rows, y = training_pairs(seqs, hiddens, heads.num_heads)
    accuracy = rank_accuracy(heads, states, rows, y, a.num_ranks)
    chain = tuple((0,) * d for d in range(1, heads.num_heads + 1))
    trees = []
    for n in a.num_nodes:
        paths = best_tree(accuracy, n)
        trees.append({"num_nodes": n, "depth": len(paths[-1]),
                      "expected_kept": round(expected_kept(paths, accuracy), 3),
                      "speculative_token_tree": str(list(paths))})
    from taskloom.bench.common import run_info
    print(json.dumps({"draft_tree": spec["method"], "model": spec.get("model"),
                      "num_prompts": len(prompts), "num_positions": len(rows),
                      "rank_accuracy": accuracy,
                      "chain": {"num_nodes": len(chain),
                                "expected_kept": round(expected_kept(chain, accuracy), 3)},
                      "trees": trees, **run_info(a.device)}))
    return 0


def add_draft_tree_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "draft-tree", help="measure draft heads and find the token trees to draft with",
        description="The model answers the prompts greedily; each of the heads named by "
                    "--speculative-config guesses along the answers (teacher-forced), and "
                    "how often its guess of each rank is the model's token gives, for each "
                    "--num-nodes, the tree that keeps the most drafts a step on average "
                    "(Medusa's tree construction). Use prompts the heads did not train on. "
                    "Prints a JSON line: each head's rank accuracies and, per tree, its "
                    "speculative_token_tree and the drafts it would keep a step.")
    p.add_argument("--prompts-file", default=None, metavar="JSONL",
                   help="prompts as train-medusa takes them (default: its built-in "
                        "questions, the training half: pass --skip-prompts past those the "
                        "heads trained on)")
    p.add_argument("--skip-prompts", type=int, default=0, metavar="N",
                   help="leave out the first N prompts")
    p.add_argument("--num-prompts", type=int, default=None, help="N prompts at most")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length per prompt")
    p.add_argument("--num-nodes", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="tree sizes (draft nodes) to build")
    p.add_argument("--num-ranks", type=int, default=8,
                   help="the guesses of each head measured, best first")
    add_engine_args(p)
    p.set_defaults(func=cmd_draft_tree)


def add_train_heads_parser(sub: argparse._SubParsersAction, method: str) -> None:
    short, long = TRAIN_HEADS_HELP[method]
    p = sub.add_parser(
        f"train-{method}", help=short,
        description=f"{long} serve as --speculative-config '{{\"method\": \"{method}\", "
                    f"\"model\": OUTPUT}}'.")
    p.add_argument("--output", required=True, help="directory to write the heads to")
    p.add_argument("--prompts-file", default=None, metavar="JSONL",
                   help='prompts to answer, a {"prompt": ...}, {"messages": [...]}, '
                        '{"conversations": [...]} (ShareGPT\'s: each human turn) or '
                        '{"prompt_token_ids": [...]} per line (default: built-in questions '
                        "on Python's reference topics, the training half)")
    p.add_argument("--num-prompts", type=int, default=None, help="the first N prompts only")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1, help="residual blocks per head")
    p.add_argument("--max-tokens", type=int, default=128, help="answer length per prompt")
    p.add_argument("--samples-per-prompt", type=int, default=1, metavar="N",
                   help="answers per prompt, sampled at --answer-temperature (seeded by "
                        "--seed): more of the model's own continuations to train on")
    p.add_argument("--answer-temperature", type=float, default=0.0, metavar="T",
                   help="temperature of the answers (default 0: greedy)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-tokens", type=int, default=128,
                   help="training positions per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss", choices=("ce", "distill"), default="ce",
                   help="fit each head to the answer's token (ce) or to the model's whole "
                        "distribution there (distill: teacher distillation)")
    p.add_argument("--draft-vocab-size", type=int, default=None, metavar="N",
                   help="the heads guess among the N tokens the answers use most (vLLM's "
                        "truncated_vocab_size): a lm head N / vocab the size, its drafts "
                        "of other tokens lost (default: the whole vocabulary)")
    add_engine_args(p)
    p.set_defaults(func=cmd_train_heads, method=method)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskloom", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="stream one completion to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true",
                     help="wrap the prompt as a user message in the chat template")
    gen.add_argument("--verbose", action="store_true")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=128, temperature=0.0)
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="interactive multi-turn chat")
    chat.add_argument("--system", default=None, help="system message")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=512, temperature=0.7)
    chat.set_defaults(func=cmd_chat)
    add_serve_parser(sub)
    add_batch_parser(sub)
    add_train_heads_parser(sub, "medusa")
    add_train_heads_parser(sub, "hydra")
    add_draft_tree_parser(sub)
    from taskloom.bench.cli import add_bench_parser
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"taskloom: error: {e}", file=sys.stderr)
        return 2


def run() -> int:
    """The `taskloom` command: `main` in a process of its own (see make_llm)."""
    global _FREEZE_HEAP_AFTER_BUILD
    _FREEZE_HEAP_AFTER_BUILD = True
    return main()


if __name__ == "__main__":
    sys.exit(run())
