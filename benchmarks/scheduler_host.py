"""The scheduler's host time per step, without a model: `max_num_seqs` requests decoding in
one batch, each step scheduled and then given a sampled token per sequence, as the engine
does. Prints a JSON line: the median microseconds of `schedule()` and of `update()` over the
steps, the best of the repeats (the machine's noise only ever adds time).

    python benchmarks/scheduler_host.py --num-seqs 256

Compare two trees by running it alternately against each (PYTHONPATH=the other tree).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from taskloom.config import SchedulerConfig
from taskloom.engine.kv_cache import KVCacheManager
from taskloom.engine.outputs import RunnerOutput
from taskloom.engine.request import Request
from taskloom.engine.scheduler import Scheduler
from taskloom.sampling_params import SamplingParams


def run(num_seqs: int, steps: int, prompt_len: int, prefix_caching: bool) -> tuple[float, float]:
    """Median seconds of schedule() and update() over `steps` decode steps."""
    kv = KVCacheManager(num_seqs * (-(-(prompt_len + steps + 16) // 16)) + 16, 16,
                        enable_prefix_caching=prefix_caching)
    sched = Scheduler(SchedulerConfig(max_num_seqs=num_seqs, max_num_batched_tokens=1 << 20),
                      kv, prompt_len + steps + 16)
    params = SamplingParams(max_tokens=steps + 10, ignore_eos=True, temperature=0)
    for i in range(num_seqs):
        sched.add_request(Request(str(i), [1000 + i] + list(range(i, i + prompt_len - 1)),
                                  params, eos_token_ids=(2,)))
    out = sched.schedule()                               # every prompt in one step
    sched.update(out, RunnerOutput(sampled={q.req_id: 5 for q in out.seqs}))
    schedule_s, update_s = [], []
    for k in range(steps):
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        sched.update(out, RunnerOutput(sampled={q.req_id: 7 + k for q in out.seqs}))
        schedule_s.append(t1 - t0)
        update_s.append(time.perf_counter() - t1)
    return statistics.median(schedule_s), statistics.median(update_s)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--prompt-len", type=int, default=228)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    a = p.parse_args()
    best = min((run(a.num_seqs, a.steps, a.prompt_len, a.prefix_caching)
                for _ in range(a.repeats)), key=sum)
    print(json.dumps({"bench": "scheduler_host", "num_seqs": a.num_seqs, "steps": a.steps,
                      "prefix_caching": a.prefix_caching,
                      "schedule_us": round(best[0] * 1e6, 1),
                      "update_us": round(best[1] * 1e6, 1)}))


if __name__ == "__main__":
    main()
