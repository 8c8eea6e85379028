"""The host's time per decode step outside the model: `max_num_seqs` requests decoding in one
batch, each step scheduled, flattened by the runner and staged for a CUDA graph replay, then
given a sampled token per sequence, as the engine does. Prints a JSON line: the median
microseconds of `schedule()`, of the runner's `_prepare` (the flat batch's host arrays), of
the graph's input staging (`DecodeInputs.load`, on the CPU here: no copy to a device), of
`update()`, and of the sampler's batch parameters rebuilt for the rows in another order (what
it pays each step whose batch changed: in continuous batching, most), over the steps, the best
of the repeats (the machine's noise only ever adds time). No model runs: the runner is built
over a one-layer model only for its state.

    python benchmarks/scheduler_host.py --num-seqs 256

Compare two trees by running it alternately against each (PYTHONPATH=the other tree).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from taskloom.bench.common import run_info
from taskloom.config import SchedulerConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request
from taskloom.engine.scheduler import Scheduler
from taskloom.models.arch import ArchConfig
from taskloom.runtime.cuda_graphs import DecodeInputs, bucket_size, default_capture_sizes
from taskloom.runtime.model_runner import ModelRunner
from taskloom.sampling_params import SamplingParams

PHASES = ("schedule", "prepare", "stage", "update", "sampler_batch")
BLOCK_SIZE = 16


def build_runner(num_blocks: int, max_model_len: int) -> ModelRunner:
    """A CPU runner for its host-side state only (the model is never called)."""
    arch = ArchConfig("llama", vocab_size=1024, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=16, max_position_embeddings=max_model_len)
    return ModelRunner(torch.nn.Identity(), arch, num_blocks, BLOCK_SIZE, torch.float32,
                       torch.device("cpu"), (2,), max_model_len)


def run(num_seqs: int, steps: int, prompt_len: int, prefix_caching: bool) -> dict[str, float]:
    """Median seconds of each phase over `steps` decode steps."""
    max_model_len = prompt_len + steps + 16
    num_blocks = num_seqs * (-(-max_model_len // BLOCK_SIZE)) + 16
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, enable_prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=1 << 20),
                      kv, max_model_len)
    runner = build_runner(num_blocks, max_model_len)
    sizes = default_capture_sizes(num_seqs)
    inputs = DecodeInputs(sizes[-1], -(-max_model_len // BLOCK_SIZE), torch.device("cpu"))
    params = SamplingParams(max_tokens=steps + 10, ignore_eos=True, temperature=0)
    for i in range(num_seqs):
        sched.add_request(Request(str(i), [1000 + i] + list(range(i, i + prompt_len - 1)),
                                  params, eos_token_ids=(2,)))
    out = sched.schedule()                               # every prompt in one step
    runner._update_states(out)
    sched.update(out, RunnerOutput(sampled={q.req_id: 5 for q in out.seqs}))
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    for k in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        batch = runner._prepare(out.seqs)
        t2 = time.perf_counter()
        inputs.load(batch.input_ids, batch.positions, batch.slots, batch.seq_lens,
                    batch.block_tables, bucket_size(sizes, len(out.seqs)))
        t3 = time.perf_counter()
        sched.update(out, RunnerOutput(sampled={q.req_id: 7 + k for q in out.seqs}))
        t4 = time.perf_counter()
        ids = [q.req_id for q in out.seqs]
        shift = k % len(ids) + 1
        changed = tuple(ids[shift:] + ids[:shift])       # the rows of a batch that changed
        t5 = time.perf_counter()
        runner.sampler._build_batch(changed)
        t6 = time.perf_counter()
        for phase, a, b in zip(PHASES, (t0, t1, t2, t3, t5), (t1, t2, t3, t4, t6)):
            times[phase].append(b - a)
    return {p: statistics.median(t) for p, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=228)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    a = p.parse_args()
    runs = [run(a.num_seqs, a.steps, a.prompt_len, a.prefix_caching) for _ in range(a.repeats)]
    print(json.dumps({"bench": "scheduler_host", "num_seqs": a.num_seqs, "steps": a.steps,
                      "prefix_caching": a.prefix_caching,
                      **{f"{p}_us": round(min(r[p] for r in runs) * 1e6, 1) for p in PHASES},
                      **run_info("cpu"),
                      "command": " ".join(["python benchmarks/scheduler_host.py"] + sys.argv[1:])}))


if __name__ == "__main__":
    main()
