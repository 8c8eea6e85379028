"""`taskloom bench throughput` and `latency` end to end on a random tiny Llama, with the HF
peers: the last line printed is the JSON result, the peer ran the same workload, the ratio is
theirs, and each result says where the engine's step time went (`step_ms`)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from taskloom.bench.summary import result_lines
from taskloom.cli import main

TINY_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=1024,
                  hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)


@pytest.mark.parametrize("peer,name", [("hf", "hf-transformers-generate_batch"),
                                       ("hf-static", "hf-transformers-generate")])
def test_throughput_json_with_peer(tmp_path: Path, capsys: pytest.CaptureFixture,
                                   peer: str, name: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "result.json"
    rc = main(["bench", "throughput", "--random-weights", "--model", str(config),
               "--num-prompts", "6", "--input-len-range", "8", "40", "--output-len", "8",
               "--peer", peer, "--peer-batch-size", "4", "--output-json", str(out)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["bench"] == "throughput" and result["num_prompts"] == 6
    assert result["step_ms"]["steps"] >= 8 and result["step_ms"]["host_only"] > 0
    assert result["startup_s"] > 0
    assert result["peer"]["name"] == name
    assert result["peer"]["output_tokens_per_s"] > 0
    assert result["ratio_vs_peer"] == pytest.approx(
        result["output_tokens_per_s"] / result["peer"]["output_tokens_per_s"], rel=1e-2)


@pytest.mark.parametrize("caching,async_scheduling", [(True, False), (False, False),
                                                      (True, True)])
def test_multi_turn_workload_reuses_each_conversation_history(
        tmp_path: Path, capsys: pytest.CaptureFixture, caching: bool,
        async_scheduling: bool) -> None:
    """With async scheduling too: blocks that end in a token sampled in flight are named
    once it is known, so the next turn finds the same blocks."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    args = ["bench", "throughput", "--random-weights", "--model", str(config),
            "--num-prompts", "4", "--input-len", "40", "--output-len", "8", "--turns", "3",
            "--user-len", "12"] + ([] if caching else ["--no-prefix-caching"]) + (
                ["--async-scheduling"] if async_scheduling else [])
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["turns"] == 3 and result["async_scheduling"] == async_scheduling
    # prompts of 40, 40+8+12 = 60 and 80 tokens; the KV of all but the last answer token is
    # computed, so turn 2 finds 2 blocks of 16 cached and turn 3 finds 4: 96 of 180 tokens
    # (the warm-up shares nothing with the workload)
    if caching:
        assert result["prefix_cache_hit_rate"] == pytest.approx(96 / 180, abs=1e-3)
    else:
        assert result["prefix_cache_hit_rate"] == 0.0


def test_lora_bench_reports_each_adapter_count_against_the_base(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    assert main(["bench", "lora", "--random-weights", "--model", str(config),
                 "--num-loras", "1", "3", "--num-prompts", "6", "--input-len", "16",
                 "--output-len", "4", "--repeats", "1", "--max-loras", "2",
                 "--lora-files", "2"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "lora" and result["max_loras"] == 2
    assert result["lora_files"] == 2
    assert [r["num_loras"] for r in result["results"]] == [1, 3]
    for r in result["results"]:
        assert r["ratio_vs_base"] == pytest.approx(
            r["output_tokens_per_s"] / result["base"]["output_tokens_per_s"], rel=1e-2)
    # three adapters through two slots, one of them left in its slot by the 1-adapter run:
    # the other two must be written in
    assert result["results"][1]["slot_writes"] >= 2


def tiny_prefill_flops(batch: int, input_len: int) -> float:
    """TINY_LLAMA's prefill FLOPs by hand: per layer q and o (64 x 64), k and v (64 x 32),
    gate, up and down (64 x 128); attention's q.k and p.v over the causal pairs of 4 heads of
    16; the LM head (1024 x 64) once per request."""
    per_layer = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128
    pairs = input_len * (input_len + 1) // 2
    return (2 * 2 * per_layer * batch * input_len + 2 * 2 * 2 * 4 * 16 * batch * pairs
            + 2 * 1024 * 64 * batch)


def test_prefill_flops_count(tmp_path: Path) -> None:
    from taskloom.bench.common import build_llm
    from taskloom.bench.latency import prefill_flops
    from taskloom.cli import build_parser
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    llm, _ = build_llm(build_parser().parse_args(
        ["bench", "latency", "--random-weights", "--model", str(config)]))
    runner = llm.engine.runner
    assert prefill_flops(runner.model, runner.arch, 3, 16) == tiny_prefill_flops(3, 16)


def test_latency_json_with_peer(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    assert main(["bench", "latency", "--random-weights", "--model", str(config),
                 "--batch-sizes", "1", "3", "--input-len", "16", "--output-len", "6",
                 "--peer", "hf"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["bench"] == "latency" and result["copy_bandwidth_gb_per_s"] > 0
    from taskloom.runtime.dtypes import resolve_dtype
    assert result["dtype"] == resolve_dtype("auto", "cpu")     # what --dtype auto ran as
    # what a CPU result depends on: the model, the vector instructions, the threads
    capability = torch.backends.cpu.get_cpu_capability()
    assert result["device"].startswith("cpu (") and f", {capability}" in result["device"]
    assert result["device"].endswith(f"{torch.get_num_threads()} threads)")
    rows, peer = result["results"], result["peer"]["results"]
    assert [r["batch_size"] for r in rows] == [1, 3] and len(peer) == 2
    for row in rows:
        assert row["decode_tokens_per_s"] == pytest.approx(
            row["batch_size"] * 5 / (row["decode_ms_per_step"] * 5 / 1000), rel=1e-2)
        assert 0 < row["fraction_of_copy_bandwidth"] < 1
        assert row["step_ms"]["steps"] >= 6
        assert row["prefill_tflops"] == pytest.approx(
            tiny_prefill_flops(row["batch_size"], 16) / (row["ttft_ms"] / 1000) / 1e12, rel=0.02)
        assert row["fraction_of_matmul_flops"] == pytest.approx(
            row["prefill_tflops"] / result["matmul_tflops"], rel=1e-2)
    # the peer's decode is its whole generate less a 1-token one, timed again where noise
    # makes that <= 0 (five short steps of a tiny model); None only if it stayed so
    assert any(p["decode_tokens_per_s"] for p in peer)
    assert result["decode_ratio_vs_peer"] == [
        pytest.approx(r["decode_tokens_per_s"] / p["decode_tokens_per_s"], rel=1e-2)
        if p["decode_tokens_per_s"] else None for r, p in zip(rows, peer)]


def test_peer_on_a_smaller_workload_compares_that_workload(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--peer-num-prompts: the peer and taskloom both run N new prompts after the main run
    (none of them cached by it), and the ratio is taken on those."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--num-prompts", "8", "--input-len-range", "8", "40", "--output-len", "6",
                 "--peer", "hf", "--peer-num-prompts", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_prompts"] == 8
    ours, peer = result["peer_workload"], result["peer"]
    assert ours["num_prompts"] == 3 and peer["output_tokens"] == 3 * 6
    assert result["ratio_vs_peer"] == pytest.approx(
        ours["output_tokens_per_s"] / peer["output_tokens_per_s"], rel=1e-2)
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--peer-num-prompts", "3"]) == 2
    assert "--peer-num-prompts needs --peer" in capsys.readouterr().err


def test_summary_pairs_runs_of_one_workload(tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    """`bench summary` over a results file (what run_gpu.sh prints last): a line per result
    and the speedup of prefix caching between the two runs of one shared-prefix workload."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    results = tmp_path / "results.jsonl"
    for flag in ([], ["--no-prefix-caching"]):
        assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                     "--num-prompts", "6", "--shared-prefix", "64", "--unique", "8",
                     "--output-len", "4", "--output-json", str(tmp_path / "r.json")]
                    + flag) == 0
        with results.open("a") as f:
            f.write((tmp_path / "r.json").read_text())
    capsys.readouterr()
    assert main(["bench", "summary", str(results)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    on, off = (json.loads(x) for x in results.read_text().splitlines())
    assert lines[0].startswith("2 results, cpu")
    assert lines[1].startswith("throughput 6x64+8/4: ") and "hit rate" in lines[1]
    assert lines[2].startswith("throughput 6x64+8/4 no-prefix-caching: ")
    assert lines[3] == (f"prefix caching on vs off, 6x64+8/4: "
                        f"{off['elapsed_s'] / on['elapsed_s']:.2f}x "
                        f"({off['elapsed_s']} s -> {on['elapsed_s']} s)")
    assert len(lines) == 4


def test_throughput_records_speculation_and_latency_refuses_it(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A random tiny model's greedy output soon repeats itself, so its drafts get accepted;
    the latency bench, whose bandwidth is per decode step, sends speculation to bench spec."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    spec = ["--speculative-config", '{"num_speculative_tokens": 3}']
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--num-prompts", "4", "--input-len", "16", "--output-len", "48", *spec]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 3,
                                            "prompt_lookup_max": 4, "prompt_lookup_min": 2,
                                            "model": None, "speculative_token_tree": None}
    assert 0 < result["spec_acceptance_rate"] <= 1
    assert "spec k=3 (acceptance" in result_lines(result)[0]
    assert main(["bench", "latency", "--random-weights", "--model", str(config), *spec]) == 2
    assert "measure speculative decoding with bench spec" in capsys.readouterr().err


def test_throughput_records_the_sliding_window(tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY_LLAMA))
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--num-prompts", "4", "--input-len", "40", "--output-len", "40",
                 "--sliding-window", "24", "--attention-sinks", "4", "--block-size", "8"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["sliding_window"] == {"size": 24, "num_sink_tokens": 4}
    assert "window 24+4 sinks" in result_lines(result)[0]
    assert main(["bench", "throughput", "--random-weights", "--model", str(config),
                 "--attention-sinks", "4"]) == 2
    assert "num_sink_tokens (4) needs a sliding window" in capsys.readouterr().err
