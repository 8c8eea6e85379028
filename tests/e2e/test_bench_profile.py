"""`bench latency|throughput --profile` end to end on a random tiny Llama: the profiled window
has the steps asked for, of the batch shape the workload gives, its summary names the model's
operators, the Chrome trace is kept where asked, and the window's requests leave nothing
behind (no request, no block), with async scheduling too."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taskloom.bench.common import build_llm
from taskloom.bench.latency import _profile_batch
from taskloom.bench.throughput import _profile_run, make_prompts
from taskloom.cli import build_parser, main
from taskloom.ops.cpu_kernels import PROFILE_PREFIX
from taskloom.sampling_params import SamplingParams

from tests.e2e.conftest import assert_pool_full
from tests.e2e.test_bench_throughput import TINY_LLAMA


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY_LLAMA))
    return path


def _assert_idle(llm) -> None:
    assert not llm.engine.has_unfinished
    assert_pool_full(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_throughput_window_is_the_steady_state_and_leaves_nothing(
        config: Path, async_scheduling: bool) -> None:
    a = build_parser().parse_args(
        ["bench", "throughput", "--random-weights", "--model", str(config),
         "--num-prompts", "12", "--input-len", "24", "--output-len", "10",
         "--max-num-seqs", "4", "--profile", "--profile-steps", "5",
         "--profile-warmup-steps", "6"] + (["--async-scheduling"] if async_scheduling else []))
    llm, _ = build_llm(a)
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    profile = _profile_run(a, llm, params)
    assert profile["steps"] == 5 and profile["warmup_steps"] == 6
    # steps 7-11 of 12 requests, 4 at a time: every step runs 4 sequences
    assert profile["step_ms"]["steps"] == 5 and profile["step_ms"]["seqs_per_step"] == 4
    assert profile["of"] == "cpu operators (self time)"
    assert 0 < profile["busy_fraction"] <= 1
    assert profile["categories_ms_per_step"]["gemm"] > 0
    # the lm head among the GEMMs: F.linear's, or (bf16, --dtype auto on a CPU that has it)
    # the small-batch head's C loop, named in the trace
    head = llm.engine.runner.model.small_batch_head
    gemms = {t["name"] for t in profile["top"] if t["category"] == "gemm"}
    assert ("aten::mm" if head is None else PROFILE_PREFIX + "bf16_linear_bf16") in gemms
    _assert_idle(llm)
    # and the engine serves on: the aborted window cached nothing wrong
    prompts = make_prompts(3, 24, None, llm.engine.vocab_size, 5)
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert [len(t) for t in again] == [10] * 3
    _assert_idle(llm)


def test_window_stops_when_the_workload_ends(config: Path) -> None:
    a = build_parser().parse_args(
        ["bench", "throughput", "--random-weights", "--model", str(config),
         "--num-prompts", "2", "--input-len", "8", "--output-len", "4", "--profile",
         "--profile-steps", "50", "--profile-warmup-steps", "2"])
    llm, _ = build_llm(a)
    profile = _profile_run(a, llm, SamplingParams(temperature=0.0, max_tokens=4,
                                                  ignore_eos=True))
    assert 0 < profile["steps"] < 50
    _assert_idle(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_latency_window_is_decode_steps_of_the_batch(config: Path,
                                                     async_scheduling: bool) -> None:
    a = build_parser().parse_args(
        ["bench", "latency", "--random-weights", "--model", str(config), "--batch-sizes", "3",
         "--input-len", "16", "--output-len", "12", "--profile", "--profile-steps", "4"]
        + (["--async-scheduling"] if async_scheduling else []))
    llm, _ = build_llm(a)
    prompts = make_prompts(3, 16, None, llm.engine.vocab_size, 1)
    before = llm.engine.step_times.steps
    profile = _profile_batch(llm, prompts, a, torch.device("cpu"))
    assert profile["steps"] == 4
    assert llm.engine.step_times.steps > before + 4
    assert "_scaled_dot_product" in " ".join(t["name"] for t in profile["top"]) or \
        profile["categories_ms_per_step"].get("attention", 0) > 0
    _assert_idle(llm)


def test_latency_cli_adds_profiles_and_keeps_traces(tmp_path: Path, config: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    traces = tmp_path / "traces"
    assert main(["bench", "latency", "--random-weights", "--model", str(config),
                 "--batch-sizes", "1", "2", "--input-len", "16", "--output-len", "8",
                 "--profile", "--profile-steps", "3", "--profile-dir", str(traces)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for row in result["results"]:
        p = row["profile"]
        assert p["steps"] == 3 and p["busy_ms_per_step"] > 0
        assert p["busy_fraction_of_timed_step"] == pytest.approx(
            p["busy_ms_per_step"] / row["decode_ms_per_step"], abs=2e-3)
    names = sorted(x.name for x in traces.iterdir())
    assert names == ["latency-batch1.json", "latency-batch2.json"]
    trace = json.loads((traces / names[0]).read_text())
    assert any(e.get("cat") == "cpu_op" for e in trace["traceEvents"])


def test_a_failing_profile_keeps_the_timings(tmp_path: Path, config: Path,
                                             capsys: pytest.CaptureFixture,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The timed result is on disk before the profile starts (a device run killed in a
    hanging profile keeps it), and a profile that raises says why in the result."""
    out = tmp_path / "result.json"
    seen_on_disk = []

    def failing_profile(*args, **kwargs):
        seen_on_disk.append(json.loads(out.read_text()))
        raise RuntimeError("CUPTI unavailable")

    monkeypatch.setattr("taskloom.bench.throughput.profile_steps", failing_profile)
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--num-prompts", "4", "--input-len", "8", "--output-len", "4", "--profile",
                 "--output-json", str(out)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["profile"] == {"error": "RuntimeError: CUPTI unavailable"}
    assert json.loads(out.read_text()) == result
    (before,) = seen_on_disk
    assert "profile" not in before and before["elapsed_s"] == result["elapsed_s"]


@pytest.mark.parametrize("num_prompts,seats,want_warmup", [
    (12, 4, 10 + 2),    # waves: the first 4 finish at step 10, then 10 // 4 steps more
    (3, 8, 1 + 2),      # all fit: every request decodes after step 1's prefill
])
def test_default_window_starts_in_the_steady_state(config: Path, num_prompts: int, seats: int,
                                                   want_warmup: int) -> None:
    a = build_parser().parse_args(
        ["bench", "throughput", "--random-weights", "--model", str(config),
         "--num-prompts", str(num_prompts), "--input-len", "24", "--output-len", "10",
         "--max-num-seqs", str(seats), "--profile", "--profile-steps", "3"])
    llm, _ = build_llm(a)
    profile = _profile_run(a, llm, SamplingParams(temperature=0.0, max_tokens=10,
                                                  ignore_eos=True))
    assert profile["warmup_steps"] == want_warmup and profile["steps"] == 3
    assert profile["step_ms"]["seqs_per_step"] == min(num_prompts, seats)
    _assert_idle(llm)


def test_profile_of_a_multi_turn_workload_is_refused_before_it_runs(
        config: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--num-prompts", "2", "--turns", "2", "--profile"]) == 2
    captured = capsys.readouterr()
    assert "--profile profiles single-turn workloads only" in captured.err
    assert captured.out == ""                  # no timed run, no result line
