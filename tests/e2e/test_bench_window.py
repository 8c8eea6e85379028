"""`taskloom bench window` end to end on the embedded model: full attention, then a window
with and without sinks, scoring the same passages; the KV the pool held, and the summary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskloom.bench.latency import attended_context
from taskloom.bench.summary import result_lines
from taskloom.bench.window import builtin_text, passages
from taskloom.cli import main
from taskloom.config import AttentionWindow


def test_window_bench_scores_every_setting_and_the_window_holds_less(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "w.json"
    # 2 passages of 128 tokens in chunks of 32; a window of 32 (2 blocks of 16) and a sink
    assert main(["bench", "window", "--num-texts", "2", "--context-len", "128", "--windows",
                 "32", "--sinks", "0", "4", "--max-num-batched-tokens", "32",
                 "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    assert result == json.loads(out.read_text())
    full, alone, sinks = result["results"]
    assert [(r["window"], r["sinks"]) for r in result["results"]] == [(None, 0), (32, 0),
                                                                     (32, 4)]
    # A chunk fills the step, so one passage runs at a time. Full attention ends holding its
    # 128 / 16 blocks; with the window, the last chunk (positions 96-127) holds blocks 4-7
    # (query 96 sees from 65 on), and with sinks block 0 too.
    assert (full["max_kv_blocks"], alone["max_kv_blocks"], sinks["max_kv_blocks"]) == (8, 4, 5)
    for r in result["results"]:
        assert r["perplexity"] > 1 and r["perplexity_past_window"] > 1
    assert printed[:-1] == result_lines(result)


def test_passages_and_refusals(capsys: pytest.CaptureFixture) -> None:
    assert "lambda" in builtin_text()
    assert passages(list(range(10)), 3, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="fewer than --num-texts 4 x --context-len 3"):
        passages(list(range(10)), 4, 3)
    assert main(["bench", "window", "--random-weights", "--model", "smollm2-135m"]) == 2
    assert "needs real weights" in capsys.readouterr().err
    assert main(["bench", "window", "--windows", "4096"]) == 2
    assert "--windows must lie in [1, --context-len)" in capsys.readouterr().err


def test_latency_counts_the_keys_a_window_lets_a_decode_read() -> None:
    assert attended_context(None, 128, 256) == 256.0     # half-way through the output
    # contexts 129..383: a window of 100 and 4 sinks reads 104 keys at every step
    assert attended_context(AttentionWindow(100, 4), 128, 256) == 104.0
    # contexts 3..5 under a window of 4 and 4 sinks: 3, 4, then 4 + 1 sink
    assert attended_context(AttentionWindow(4, 4), 2, 4) == (3 + 4 + 5) / 3
