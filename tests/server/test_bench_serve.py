"""`taskloom bench serve` against a real server: Poisson arrivals, every request completes,
the JSON line last carries latency percentiles and throughput."""
from __future__ import annotations

import json
import subprocess
import sys

from taskloom.server.launch import ServerThread


def _bench(server: ServerThread, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "taskloom.cli", "bench", "serve",
                          "--base-url", server.base_url, "--num-prompts", "6",
                          "--input-len", "16", "--output-len", "8", *args],
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_serve_poisson(server: ServerThread) -> None:
    r = _bench(server, "--request-rate", "4")
    assert r["bench"] == "serve" and r["model"] == "smol"
    assert r["completed"] == 6 and r["failed"] == 0
    assert r["output_tokens_per_s"] > 0 and r["duration_s"] > 0
    for key in ("ttft", "itl", "e2e"):
        p = r[key]
        assert 0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"], (key, p)
    assert r["e2e"]["p50_ms"] >= r["ttft"]["p50_ms"]


def test_bench_serve_concurrency_and_bad_url(server: ServerThread) -> None:
    r = _bench(server, "--max-concurrency", "2")
    assert r["completed"] == 6 and r["max_concurrency"] == 2
    bad = subprocess.run([sys.executable, "-m", "taskloom.cli", "bench", "serve",
                          "--base-url", "http://127.0.0.1:9", "--num-prompts", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no server answers" in bad.stderr
