"""`taskloom bench snapkv` end to end on the embedded model: full attention, SnapKV and a
sliding window of the same size answer the same needle questions; what each found and the
KV each held while decoding, and the summary."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from taskloom.bench.snapkv import digits_right, needle_prompts
from taskloom.bench.summary import result_lines
from taskloom.cli import main


def test_snapkv_bench_runs_every_setting_and_compression_holds_less(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "s.json"
    assert main(["bench", "snapkv", "--num-prompts", "2", "--context-len", "256",
                 "--budgets", "64", "--kernel-sizes", "7", "--max-tokens", "6",
                 "--output-json", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    result = json.loads(printed[-1])
    assert result == json.loads(out.read_text())
    full, snap, window = result["results"]
    assert [r["method"] for r in result["results"]] == ["full", "snapkv", "window"]
    assert (snap["budget"], snap["kernel_size"], snap["pooling"]) == (64, 7, "max")
    assert (window["sliding_window"], window["sinks"]) == (60, 4)
    # the model finds both needles with full attention
    assert full["found"] == 2 and full["same_as_full"] == 2 and full["digits_right"] == 1.0
    assert snap["compressed"] == 2 and full["compressed"] == 0
    # 256 tokens are 16 blocks of 16 a prompt (17 with the answer); 64 kept entries 4 (5)
    assert full["decode_kv_blocks"] == 2 * 17 and snap["decode_kv_blocks"] == 2 * 5
    assert snap["max_kv_blocks"] > full["max_kv_blocks"]     # the kept blocks, at first
    assert window["decode_kv_blocks"] < full["decode_kv_blocks"]
    assert printed[:-1] == result_lines(result)
    assert "needles" in printed[1] and "0.29x full" in printed[1]


def test_needles_digits_and_refusals(capsys: pytest.CaptureFixture) -> None:
    prompts, codes = needle_prompts(lambda s: [ord(c) for c in s], "abcdefgh" * 400, 3, 200,
                                    seed=1)
    assert [len(p) for p in prompts] == [200] * 3 and len(set(codes)) == 3
    for p, code in zip(prompts, codes):
        text = "".join(map(chr, p))
        assert f"The secret code is {code}." in text and text.endswith("The secret code is")
    with pytest.raises(ValueError, match="too few for --num-prompts 9"):
        needle_prompts(lambda s: [ord(c) for c in s], "x" * 500, 9, 200, seed=1)
    assert digits_right(" 60494.", "60494") == 1.0
    assert digits_right(" 604.\n\nThe 9", "60494") == 0.6
    assert digits_right(" a list", "60494") == 0.0
    assert main(["bench", "snapkv", "--random-weights", "--model", "smollm2-135m"]) == 2
    assert "needs real weights" in capsys.readouterr().err
    assert main(["bench", "snapkv", "--budgets", "16"]) == 2
    assert "--budgets must lie in (--snapkv-window, --context-len)" in capsys.readouterr().err
