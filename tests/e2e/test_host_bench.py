"""The host benchmarks in benchmarks/ run as the README gives them and report what they say."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scheduler_host.py"


def test_host_bench_reports_each_phase() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--num-seqs", "12", "--steps", "5",
                           "--repeats", "1", "--prompt-len", "40"],
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "scheduler_host" and result["num_seqs"] == 12
    assert all(result[f"{phase}_us"] > 0 for phase in ("schedule", "prepare", "stage", "update",
                                                       "sampler_batch"))


def test_detokenizer_bench_reports_a_time_per_token(tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text("Hello 🌍! naïve café. " * 20, encoding="utf-8")
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "detokenizer_host.py"),
                           "--text", str(text), "--repeats", "1"],
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "detokenizer_host" and result["tokens"] > 50
    assert result["us_per_token"] > 0 and result["commit"]


def test_serve_host_bench_reports_cpu_per_token(tmp_path: Path) -> None:
    from tests.models.tiny_models import write_tiny_config
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "serve_host.py"), "--model",
                           write_tiny_config(tmp_path), "--num-prompts", "8",
                           "--output-len", "8", "--repeats", "2", "--max-num-seqs", "8"],
                          capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["bench"] == "serve_host" and len(result["runs"]) == 2
    # CPU time comes in clock ticks, and the kernel rounds a process's total and each of its
    # threads' apart: a short run may count none, or a tick more for the loop than for all
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK") / (8 * 8)
    for run in result["runs"]:
        assert run["failed"] == 0 and run["tokens_per_chunk"] >= 1
        assert 0 <= run["loop_cpu_us_per_token"] <= run["process_cpu_us_per_token"] + 2 * tick_us
        assert run["engine_process_cpu_us_per_token"] >= 0      # the engine's own process
    assert result["engine_process"] and result["engine_process_rss_mb"] > 0


def test_engine_host_bench_reports_phases_and_gc_pauses() -> None:
    for extra in ([], ["--freeze"]):
        done = subprocess.run([sys.executable, str(SCRIPT.parent / "engine_host.py"),
                               "--num-seqs", "8", "--output-len", "16", "--repeats", "1",
                               "--text", str(SCRIPT.parents[1] / "README.md"), *extra],
                              capture_output=True, text=True, timeout=300, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result["bench"] == "engine_host" and result["freeze"] == bool(extra)
        assert all(result[f"{p}_ms"] > 0 for p in ("schedule", "update", "outputs"))
        assert result["gc_longest_pause_ms"] >= 0 and result["commit"]
