"""The engine core's host time per decode step with output processing: `--num-seqs` requests
decoding in one batch through EngineCore.step, with the embedded model's tokenizer
(incremental detokenization, stop-string matching) and outputs of `--output-kind` (DELTA is
what a server streams, FINAL_ONLY what an offline batch asks for), over a runner that returns
the next token of a text at once (no model). Prints a JSON line: the engine's mean milliseconds
per step by phase (schedule, update with per-token output processing, building the outputs),
the best of `--repeats`. On a server the engine thread holds the GIL for all of it, which the
event loop streaming to the clients then waits for.

It also reports the garbage collector's pauses during the steps (the longest, and the oldest
generation's in all), which stall a step whole; `--freeze` first moves the heap built so far
into the permanent generation, as the `taskloom` command does once its engine is built.

    python benchmarks/engine_host.py --num-seqs 256 --output-kind delta [--freeze]

Compare two trees by running it alternately against each (PYTHONPATH=the other tree).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Callable

from taskloom.bench.common import run_info
from taskloom.config import SchedulerConfig
from taskloom.engine.core import EngineCore
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.outputs import RunnerOutput, SchedulerOutput
from taskloom.engine.scheduler import Scheduler
from taskloom.models.embedded import embedded_model_path
from taskloom.outputs import OutputKind
from taskloom.sampling_params import SamplingParams
from taskloom.tokenizer.tokenizer import load_tokenizer

PHASES = ("schedule", "update", "outputs", "host_only")


class _Done:
    def __init__(self, out: RunnerOutput) -> None:
        self.out = out

    def result(self) -> RunnerOutput:
        return self.out


class TextRunner:
    """A runner whose every sampled token is the next of a token stream (a real text's)."""

    prepare_s = 0.0

    def __init__(self, stream: list[int]) -> None:
        self.stream = stream
        self.k = 0

    def submit(self, sched: SchedulerOutput,
               before_sampling: Callable[[], None] | None = None) -> _Done:
        if before_sampling is not None:     # as the model runner does, before it samples
            before_sampling()
        out = RunnerOutput()
        for seq in sched.seqs:
            if seq.sample:
                self.k += 1
                out.sampled[seq.req_id] = self.stream[self.k % len(self.stream)]
        return _Done(out)

    def add_lora(self, lora: object) -> None: ...

    def load_loras(self, loras: list) -> dict:
        return {}

    def remove_lora(self, lora_id: int) -> None: ...


class GCPauses:
    """The collector's pauses while `on`, by generation."""

    def __init__(self) -> None:
        self.on = False
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = 0.0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._start = time.perf_counter()
            return
        pause = time.perf_counter() - self._start
        self.count[info["generation"]] += 1
        self.seconds[info["generation"]] += pause
        self.longest = max(self.longest, pause)


def run(num_seqs: int, output_len: int, kind: OutputKind, stream: list[int], tokenizer,
        freeze: bool) -> dict[str, float]:
    """Mean ms per step of each phase over the decode steps of one batch, and the collector's
    pauses meanwhile."""
    prompt_len = 200
    blocks = -(-(prompt_len + output_len) // 16) + 1
    kv = KVCacheManager(num_seqs * blocks + 16, 16)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=1 << 20),
                      kv, prompt_len + output_len + 16)
    core = EngineCore(sched, TextRunner(stream), tokenizer, tokenizer.vocab_size, (0,))
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
    for i in range(num_seqs):
        core.add_request(str(i), stream[i:i + prompt_len], params, output_kind=kind)
    core.step()                                          # every prompt in one step
    before = dataclasses.replace(core.step_times)        # the prefill step's, to subtract
    if freeze:
        gc.collect()
        gc.freeze()
    pauses = GCPauses()
    pauses.on = True
    while core.has_unfinished:
        core.step()
    pauses.on = False
    gc.callbacks.remove(pauses._callback)
    gc.unfreeze()
    ms = core.step_times.since(before).per_step_ms()
    return {**{p: ms[p] for p in PHASES}, "gc_longest_pause_ms": round(pauses.longest * 1e3, 2),
            "gc_oldest_generation_collections": pauses.count[2],
            "gc_oldest_generation_ms": round(pauses.seconds[2] * 1e3, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-kind", choices=[k.value for k in OutputKind], default="delta")
    p.add_argument("--text", default="README.md", help="the text whose tokens are 'sampled'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--freeze", action="store_true",
                   help="freeze the heap before the steps (gc.freeze), as `taskloom` does")
    a = p.parse_args()
    tokenizer = load_tokenizer(embedded_model_path())
    with open(a.text, encoding="utf-8") as f:
        stream = tokenizer.encode(f.read()[:40000])
    if len(stream) < a.num_seqs + 200:
        raise SystemExit(f"{a.text} has too few tokens for {a.num_seqs} prompts")
    kind = OutputKind(a.output_kind)
    runs = [run(a.num_seqs, a.output_len, kind, stream, tokenizer, a.freeze)
            for _ in range(a.repeats)]
    print(json.dumps({"bench": "engine_host", "num_seqs": a.num_seqs,
                      "output_len": a.output_len, "output_kind": a.output_kind,
                      "freeze": a.freeze,
                      **{f"{p}_ms": min(r[p] for r in runs) for p in PHASES},
                      # the pauses: of every repeat, the worst
                      **{k: max(r[k] for r in runs) for k in (
                          "gc_longest_pause_ms", "gc_oldest_generation_collections",
                          "gc_oldest_generation_ms")},
                      **run_info("cpu"),
                      "command": " ".join(["python benchmarks/engine_host.py"] + sys.argv[1:])}))


if __name__ == "__main__":
    main()
