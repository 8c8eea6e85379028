"""`taskloom bench kernels`: each op alone at a model's shapes. On the CPU with the torch
references (what a device run's JSON holds, in miniature), and with the Triton kernels (the
interpreter here, compiled in a device run): every op agrees with its torch reference, and
every swept launch setting of the attention kernels computes what the default computes."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from taskloom.bench import kernels
from taskloom.bench.summary import result_lines
from taskloom.ops.linear import packing_supported
from tests.models.tiny_models import write_tiny_config
from tests.ops.triton_marks import DEVICES

OPS = {"linear_qkv", "linear_o", "linear_gate_up", "linear_down", "lm_head",
       "fused_add_rms_norm", "rotary", "write_kv", "rotary_to_cache", "silu_and_mul",
       "decode_attention",
       "extend_attention"}


def _args(model: str, device: str, ops: str, **kw: object) -> argparse.Namespace:
    return argparse.Namespace(**{
        "model": model, "device": device, "dtype": "float32", "ops": ops, "batch_sizes": [2],
        "context_lens": [40], "prefill_tokens": [48], "prompt_len": 24, "max_model_len": 1024,
        "block_size": 16, "repeats": 1, "sweep": False, "sweep_budget": 600.0, **kw})


def test_cli_times_every_op_with_the_torch_references(tmp_path: Path) -> None:
    model = write_tiny_config(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "taskloom.cli", "bench", "kernels", "--model", model,
         "--device", "cpu", "--dtype", "float32", "--ops", "torch", "--batch-sizes", "1", "4",
         "--context-lens", "32", "--prefill-tokens", "64", "--prompt-len", "32",
         "--output-json", str(tmp_path / "k.json")],
        capture_output=True, text=True, timeout=300, check=True)
    lines = out.stdout.strip().splitlines()
    r = json.loads(lines[-1])
    assert r == json.loads((tmp_path / "k.json").read_text())
    assert r["bench"] == "kernels" and r["ops"] == "torch" and r["commit"]
    assert {row["op"] for row in r["results"]} == OPS
    decode = [row for row in r["results"] if row["phase"] == "decode"]
    assert sorted({row.get("tokens", row.get("batch")) for row in decode}) == [1, 4]
    for row in r["results"]:
        assert row["us"] > 0
        assert ("gb_per_s" in row) != ("tflops" in row), row
        assert "max_abs_diff_vs_torch" not in row      # they are the reference
    attn = [row for row in r["results"] if row["op"] == "decode_attention"]
    assert [row["splits"] for row in attn] == ["auto", "auto"]   # no graph for the torch ops
    # the summary lines come first: a header, then a line per result
    assert lines[0].startswith("kernels (torch") and len(lines) == len(r["results"]) + 2
    assert "--sweep" in subprocess.run(
        [sys.executable, "-m", "taskloom.cli", "bench", "kernels", "--help"],
        capture_output=True, text=True, timeout=60).stdout


@pytest.mark.parametrize("device", DEVICES)
def test_triton_kernels_match_torch_and_every_swept_setting_matches_the_default(
        tmp_path: Path, device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from taskloom.ops.triton import decode_attention, extend_attention
    monkeypatch.setattr(kernels, "SWEEP_BLOCK_N", (32, 128))
    monkeypatch.setattr(kernels, "SWEEP_WARPS", (2,))
    monkeypatch.setattr(kernels, "SWEEP_STAGES", (None,))
    monkeypatch.setattr(kernels, "SWEEP_BLOCK_ROWS", (128,))
    defaults = (decode_attention.DECODE_TILES, extend_attention.EXTEND_TILES,
                extend_attention.BLOCK_ROWS)
    r = kernels.run_kernels(_args(write_tiny_config(tmp_path), device, "triton", sweep=True))
    assert r["ops"] == "triton" and {row["op"] for row in r["results"]} == OPS
    for row in r["results"]:
        if not row["op"].startswith(("linear", "lm_head")):
            assert row["max_abs_diff_vs_torch"] < 1e-5, row
    graph = [row for row in r["results"] if row["op"] == "decode_attention"
             and row["splits"] != "auto"]
    assert [row["splits"] for row in graph] == [4]      # 1,024 tokens of graph context, 256 a split
    assert len(r["sweep"]) == 2 + 2 and len(r["best"]) == 2
    for row in r["sweep"]:
        assert "error" not in row and row["max_abs_diff_vs_default"] < 1e-5, row
    assert {tuple(sorted(row["launch"].items())) for row in r["sweep"]} == {
        (("block_n", 32), ("num_warps", 2)), (("block_n", 128), ("num_warps", 2)),
        (("block_n", 32), ("block_rows", 128), ("num_warps", 2)),
        (("block_n", 128), ("block_rows", 128), ("num_warps", 2))}
    for b in r["best"]:
        assert b["settings_timed"] == b["settings"] == 2 and b["speedup"] > 0
    assert r["default_launch"]["extend"]["block_rows"] == 64
    assert (decode_attention.DECODE_TILES, extend_attention.EXTEND_TILES,
            extend_attention.BLOCK_ROWS) == defaults      # the sweep put them back


@pytest.mark.parametrize("device", DEVICES)
def test_launch_settings_reach_the_kernels(device: str) -> None:
    """A setting the launch cannot take fails, so the sweep's settings are the ones used."""
    from taskloom.ops.triton import decode_attention
    import torch
    q = torch.randn(1, 4, 16, device=device)
    cache = torch.randn(2, 3, 16, 2, 16, device=device)
    tables = torch.tensor([[1, 2]], dtype=torch.int32, device=device)
    lens = torch.tensor([20], dtype=torch.int32, device=device)
    with kernels.launch_settings("decode", 48, 4, None):   # not a power of two: refused
        with pytest.raises(Exception):
            decode_attention.paged_decode_attention(q, cache, tables, lens, 0.25, 20, 1)
    out = decode_attention.paged_decode_attention(q, cache, tables, lens, 0.25, 20, 1)
    assert out.shape == q.shape


@pytest.mark.skipif(not packing_supported(torch.bfloat16),
                    reason="oneDNN on this CPU has no native bf16 GEMM")
def test_cpu_bf16_projections_are_timed_packed_and_plain(tmp_path: Path) -> None:
    r = kernels.run_kernels(_args(write_tiny_config(tmp_path), "cpu", "torch",
                                  dtype="bfloat16", context_lens=[], prefill_tokens=[]))
    rows = {(row["op"], row.get("weights")): row for row in r["results"]}
    for op in ("linear_qkv", "linear_o", "linear_gate_up", "linear_down"):
        assert "max_abs_diff_vs_torch" not in rows[op, "plain"]
        assert rows[op, "packed"]["max_abs_diff_vs_torch"] < 0.05, rows[op, "packed"]
    assert ("lm_head", None) in rows         # the engine does not pack the lm head
    assert "packed weights" in "\n".join(result_lines(r))


@pytest.mark.skipif(torch.cuda.is_available(), reason="asks for a GPU this machine lacks")
def test_a_missing_gpu_is_named(capsys: pytest.CaptureFixture) -> None:
    from taskloom.cli import main
    assert main(["bench", "kernels"]) == 2        # --device cuda by default
    err = capsys.readouterr().err
    assert "device 'cuda': " in err and "use cpu" in err and "Traceback" not in err
