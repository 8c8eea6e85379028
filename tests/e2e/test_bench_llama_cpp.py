"""`taskloom bench latency --peer llama.cpp`: the GGUF copy llama.cpp runs holds the model's
weights in the bench's dtype, what the peer cannot do is refused before taskloom's run, and
where llama.cpp is installed the same batches run through its llama-batched-bench."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from taskloom.bench.llama_cpp import BATCHED_BENCH, check_llama_cpp_peer, gguf_copy_as
from taskloom.cli import main
from taskloom.models.gguf_weights import GGUFCheckpoint
from taskloom.runtime.dtypes import TORCH_DTYPES
from tests.models.gguf_files import write_gguf_from_hf
from tests.models.tiny_models import build_tiny_hf

@pytest.mark.parametrize("dtype,matrix_type,file_type", [
    ("float32", Q.F32, gguf.LlamaFileType.ALL_F32),
    ("float16", Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    ("bfloat16", Q.BF16, gguf.LlamaFileType.MOSTLY_BF16)])
def test_the_copy_holds_the_dequantized_weights_in_the_dtype(
        tmp_path: Path, dtype: str, matrix_type: Q, file_type: gguf.LlamaFileType) -> None:
    hf = build_tiny_hf("llama-llama3-gqa")
    src, dst = str(tmp_path / "q8.gguf"), str(tmp_path / "copy.gguf")
    write_gguf_from_hf(src, hf.config, hf.state_dict(), qtype=Q.Q8_0)
    gguf_copy_as(src, dst, dtype)
    original, copy = GGUFCheckpoint(src), GGUFCheckpoint(dst)
    arch = original.arch_config()
    assert copy.arch_config() == arch
    assert copy.reader.fields["general.file_type"].contents() == int(file_type)
    assert copy.reader.fields["tokenizer.ggml.tokens"].contents() == \
        original.reader.fields["tokenizer.ggml.tokens"].contents()
    types = {t.name: t.tensor_type for t in copy.reader.tensors}
    assert types["blk.0.attn_q.weight"] == matrix_type and types["blk.0.attn_norm.weight"] == Q.F32
    want, got = dict(original.weights(arch)), dict(copy.weights(arch))
    assert want.keys() == got.keys()
    for name, w in want.items():
        rounded = w if w.dim() == 1 else w.to(TORCH_DTYPES[dtype]).float()
        assert torch.equal(got[name], rounded), name
    assert not torch.equal(want["model.layers.0.mlp.down_proj.weight"],
                           hf.model.layers[0].mlp.down_proj.weight)   # Q8_0, dequantized


@pytest.mark.parametrize("args,message", [
    (["--llama-cpp-dir", "{tmp}"], f"{BATCHED_BENCH} is not in --llama-cpp-dir"),
    (["--random-weights", "--model", "smollm2-135m"], "not --random-weights"),
    (["--device", "meta"], "device must be cpu or cuda, got 'meta'")])
def test_what_the_peer_cannot_do_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str) -> None:
    args = [x.replace("{tmp}", str(tmp_path)) for x in args]
    assert main(["bench", "latency", "--peer", "llama.cpp", "--batch-sizes", "1",
                 "--input-len", "8", "--output-len", "4", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_peer_refuses_a_gpu_run() -> None:
    """(A GPU is a device this machine may not have: asked of the peer directly.)"""
    a = argparse.Namespace(device="cuda", random_weights=False)
    with pytest.raises(ValueError, match="--peer llama.cpp runs on the CPU; got --device cuda"):
        check_llama_cpp_peer(a)


def test_a_llama_cpp_that_cannot_print_json_lines_is_refused_before_the_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A build from before `--output-format jsonl`: its help lists no such flag."""
    old = tmp_path / BATCHED_BENCH
    old.write_text("#!/bin/sh\necho 'usage: llama-batched-bench -m FNAME [-npp N] [-ntg N]'\n")
    old.chmod(0o755)
    assert main(["bench", "latency", "--peer", "llama.cpp", "--llama-cpp-dir", str(tmp_path),
                 "--batch-sizes", "1", "--input-len", "8", "--output-len", "4"]) == 2
    assert "is too old" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which(BATCHED_BENCH) is None,
                    reason=f"llama.cpp is not installed ({BATCHED_BENCH} is not on PATH; "
                           f"benchmarks/build_llama_cpp.sh builds it)")
@pytest.mark.parametrize("weights,described", [("dtype", "in F32"), ("file", "as stored")])
def test_latency_runs_the_same_batches_through_llama_cpp(
        tmp_path: Path, capsys: pytest.CaptureFixture, weights: str, described: str) -> None:
    out = tmp_path / "result.json"
    assert main(["bench", "latency", "--peer", "llama.cpp", "--peer-weights", weights,
                 "--batch-sizes", "1", "3", "--input-len", "16", "--output-len", "6",
                 "--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    peer = result["peer"]
    assert peer["name"] == "llama.cpp-batched-bench" and described in peer["weights"]
    assert peer["threads"] == torch.get_num_threads() and peer["version"]
    assert "-npp 16 -ntg 5 -npl 1,3" in peer["command"]
    assert [r["batch_size"] for r in peer["results"]] == [1, 3]
    for ours, theirs, ratio in zip(result["results"], peer["results"],
                                   result["decode_ratio_vs_peer"]):
        assert theirs["ttft_ms"] > 0 and theirs["decode_tokens_per_s"] > 0
        assert ratio == pytest.approx(
            ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"], rel=1e-2)
