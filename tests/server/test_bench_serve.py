"""`taskloom bench serve` against a real server: Poisson arrivals, every request completes,
the JSON line last carries latency percentiles and throughput; token-id prompts against a
server with no tokenizer."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from taskloom import LLM
from taskloom.server.launch import ServerThread
from tests.models.tiny_models import write_tiny_config
from tests.server.conftest import start_server, wait_idle


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


def test_bench_serve_token_ids_against_a_server_without_tokenizer(tmp_path: Path) -> None:
    """A random-weights server streams no text: `--token-ids` sends token prompts and times
    tokens by the ids each chunk returns."""
    llm = LLM(write_tiny_config(tmp_path), random_weights=True, num_blocks=128, block_size=4)
    st = start_server(llm)
    try:
        r = _bench(st, "--token-ids")
        assert r["completed"] == 6 and r["failed"] == 0
        assert r["prompts"] == "token_ids" and r["output_tokens_per_s"] > 0
        assert 0 < r["ttft"]["p50_ms"] and 0 < r["itl"]["p50_ms"]
        assert 1 <= r["tokens_per_chunk"] <= 8      # a chunk carries one step's or more
        wait_idle(llm)
    finally:
        st.stop()
