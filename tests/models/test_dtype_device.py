"""`dtype="auto"` (the CLI's default) and the device check: bf16 where the CPU multiplies it,
float32 elsewhere; a device that is not there is refused with its name before anything is
built."""
from __future__ import annotations

import pytest
import torch

from taskloom import LLM, SamplingParams
from taskloom.cli import build_parser
from taskloom.runtime.dtypes import check_device, cpu_has_native_bf16, resolve_dtype


def test_auto_dtype_is_bf16_where_the_cpu_multiplies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_dtype("float16", "cpu") == "float16"
    assert resolve_dtype("auto", "cpu") == ("bfloat16" if cpu_has_native_bf16() else "float32")
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, "
                                         "float16, got 'fp8'"):
        resolve_dtype("fp8", "cpu")
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert not cpu_has_native_bf16() and resolve_dtype("auto", "cpu") == "float32"
    assert build_parser().parse_args(["serve"]).dtype == "auto"      # the CLI's default


def test_an_engine_built_with_auto_runs_the_resolved_dtype(tiny_model: str) -> None:
    from tests.e2e.conftest import assert_pool_full
    llm = LLM(tiny_model, dtype="auto", num_blocks=16, block_size=4)
    want = resolve_dtype("auto", "cpu")
    assert llm.config.model.dtype == want
    assert llm.engine.runner.model.model.embed_tokens.weight.dtype == getattr(torch, want)
    out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    assert_pool_full(llm)


def test_a_device_that_is_not_there_is_named() -> None:
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device must be cpu or cuda .*got 'gpu'"):
        LLM(device="gpu")
    with pytest.raises(ValueError, match="device must be cpu or cuda, got 'mps'"):
        check_device("mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': .*; use cpu"):
            LLM(device="cuda", dtype="auto")
