"""The server's CPU time per streamed token: `taskloom serve` on a random-weights model (a
config.json or a named shape), `taskloom bench serve --token-ids` against it `--repeats`
times, and the CPU the server spent meanwhile, read from /proc (Linux): its main thread (the
event loop, which encodes and sends every chunk), the whole server process, and the engine's
process (its child; with --no-engine-process the engine is a thread of the server's process,
counted in the server's). Prints a JSON line: per repeat and the median, microseconds of CPU
per output token, output tokens/s, tokens per chunk, the inter-token latency, and each
process's resident memory at the end.

On a GPU the engine thread mostly waits for the device, and the event loop's time per token
bounds how many streams one server feeds; on this kind of small CPU machine the client, the
engine and the loop share two cores, so compare loop CPU per token, not throughput.

    python benchmarks/serve_host.py --model config.json --num-prompts 256 --output-len 128

Compare two trees by running it alternately from each (cd TREE; PYTHONPATH=TREE).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import httpx

from taskloom.bench.common import run_info
from taskloom.server.launch import free_port


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return round(kb / 1024, 1)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def bench_serve(base_url: str, num_prompts: int, input_len: int, output_len: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "taskloom.cli", "bench", "serve", "--base-url", base_url,
         "--num-prompts", str(num_prompts), "--input-len", str(input_len), "--output-len",
         str(output_len), "--token-ids"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a config.json or a named shape")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                   help="passed to taskloom serve")
    a = p.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "taskloom.cli", "serve", "--random-weights", "--model", a.model,
         "--port", str(port), "--max-num-seqs", str(a.max_num_seqs),
         "--engine-process" if a.engine_process else "--no-engine-process"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.5)
        bench_serve(base_url, 16, a.input_len, 8)                      # warm-up
        # the engine's process: the spawned child (multiprocessing's resource tracker aside)
        engine = [c for c in children(server.pid) if a.engine_process
                  and b"spawn_main" in open(f"/proc/{c}/cmdline", "rb").read()]
        runs = []
        for _ in range(a.repeats):
            loop0, all0 = cpu_seconds(server.pid, server.pid), cpu_seconds(server.pid)
            engine0 = sum(cpu_seconds(c) for c in engine)
            r = bench_serve(base_url, a.num_prompts, a.input_len, a.output_len)
            loop1, all1 = cpu_seconds(server.pid, server.pid), cpu_seconds(server.pid)
            engine1 = sum(cpu_seconds(c) for c in engine)
            tokens = r["completed"] * a.output_len
            runs.append({"loop_cpu_us_per_token": round((loop1 - loop0) / tokens * 1e6, 1),
                         "process_cpu_us_per_token": round((all1 - all0) / tokens * 1e6, 1),
                         "engine_process_cpu_us_per_token":
                             round((engine1 - engine0) / tokens * 1e6, 1) if engine else None,
                         "output_tokens_per_s": r["output_tokens_per_s"],
                         "itl_p50_ms": r["itl"]["p50_ms"], "itl_p99_ms": r["itl"]["p99_ms"],
                         "tokens_per_chunk": r.get("tokens_per_chunk"),
                         "failed": r["failed"]})
        memory = {"server_rss_mb": rss_mb(server.pid),
                  "engine_process_rss_mb": rss_mb(engine[0]) if engine else None}
    finally:
        server.terminate()
        server.wait(timeout=60)
    median = {k: statistics.median(run[k] for run in runs)
              for k in ("loop_cpu_us_per_token", "process_cpu_us_per_token",
                        "output_tokens_per_s", "itl_p50_ms", "itl_p99_ms")}
    print(json.dumps({"bench": "serve_host", "model": a.model, "num_prompts": a.num_prompts,
                      "engine_process": a.engine_process,
                      "input_len": a.input_len, "output_len": a.output_len,
                      "median": median, **memory, "runs": runs, **run_info("cpu"),
                      "command": " ".join(["python benchmarks/serve_host.py"] + sys.argv[1:])}))


if __name__ == "__main__":
    main()
