"""`taskloom bench summary` on results of every kind (no torch): the exact lines the device run
ends with, and which runs are paired for a speedup (same workload, one setting apart, the
fastest of repeats) and which are not."""
from __future__ import annotations

from taskloom.bench.summary import comparison_lines, result_lines


def throughput(elapsed: float, **over: object) -> dict:
    r = {"bench": "throughput", "model": "llama-3.1-8b", "dtype": "bfloat16",
         "num_prompts": 200, "input_len": 128, "output_len": 64, "shared_prefix": 2000,
         "num_prefixes": 1, "unique_len": 64, "turns": 1, "prefix_caching": True,
         "prefix_aware_order": True, "async_scheduling": False, "elapsed_s": elapsed,
         "output_tokens_per_s": 1000.0, "total_tokens_per_s": 5000.0,
         "prefix_cache_hit_rate": 0.96, "startup_s": 12.5,
         "step_ms": {"execute": 9.5, "wait": 8.0, "host_only": 1.2}}
    r.update(over)
    return r


def test_a_line_per_result_of_each_kind() -> None:
    assert result_lines(throughput(2.0, peer={"name": "hf-transformers-generate_batch"},
                                   ratio_vs_peer=31.5, peer_workload={"num_prompts": 128},
                                   prefix_caching=False)) == [
        "throughput 200x2000+64/64 no-prefix-caching: 1000 out tok/s, 5000 total, 2.0 s "
        "(startup 12.5 s), hit rate 0.96; per step 9.5 ms in the runner (8.0 waiting), 1.2 "
        "host; 31.5x hf-transformers-generate_batch (on 128 prompts)"]
    latency = {"bench": "latency", "input_len": 128, "output_len": 256,
               "copy_bandwidth_gb_per_s": 4300.0, "decode_ratio_vs_peer": [14.2],
               "peer": {"name": "hf-transformers-generate"},
               "results": [{"batch_size": 1, "decode_tokens_per_s": 240.4,
                            "achieved_gb_per_s": 3900.1, "fraction_of_copy_bandwidth": 0.907,
                            "ttft_ms": 21.5}]}
    assert result_lines(latency) == [
        "latency batch 1 (128 in, 256 out): 240 tok/s, 3900.1 GB/s = 0.91 of a 4300.0 GB/s "
        "copy, TTFT 21.5 ms; 14.2x hf-transformers-generate"]
    latency["peer"] = {"name": "llama.cpp-batched-bench", "weights": "model.gguf in F32"}
    assert result_lines(latency)[0].endswith(
        "; 14.2x llama.cpp-batched-bench on model.gguf in F32")
    latency["peer"] = {"name": "hf-transformers-generate"}
    latency["results"][0].update(prefill_tflops=95.3, fraction_of_matmul_flops=0.1209)
    latency["matmul_tflops"] = 788.2
    latency["async_scheduling"] = True
    assert result_lines(latency) == [
        "latency async batch 1 (128 in, 256 out): 240 tok/s, 3900.1 GB/s = 0.91 of a 4300.0 GB/s "
        "copy, TTFT 21.5 ms = 95.3 TFLOP/s, 0.12 of a 788.2 TFLOP/s matmul; 14.2x "
        "hf-transformers-generate"]
    lora = {"bench": "lora", "num_prompts": 512, "input_len": 128, "output_len": 128,
            "base": {"output_tokens_per_s": 9000.0},
            "results": [{"num_loras": 8, "ratio_vs_base": 0.95},
                        {"num_loras": 64, "ratio_vs_base": 0.9}]}
    assert result_lines(lora) == ["lora 512x128/128, base 9000 out tok/s: 8 adapters 0.95x, "
                                  "64 adapters 0.9x"]
    serve = {"bench": "serve", "completed": 511, "num_prompts": 512, "request_rate": "inf",
             "output_tokens_per_s": 7000.4, "ttft": {"p50_ms": 80.0, "p99_ms": 300.0},
             "itl": {"p50_ms": 12.0}}
    assert result_lines(serve) == ["serve 511/512 at rate inf: 7000 out tok/s, TTFT p50 80.0 "
                                   "ms p99 300.0, ITL p50 12.0 ms"]
    serve["tokens_per_chunk"] = 1.7           # results from this session on carry it
    assert result_lines(serve)[0].endswith("ITL p50 12.0 ms, 1.7 tokens a chunk")


def test_speedups_pair_one_workload_one_setting_apart() -> None:
    runs = [throughput(2.0), throughput(1.5), throughput(12.0, prefix_caching=False),
            throughput(3.0, async_scheduling=True),       # against the two sync runs
            throughput(9.0, num_prompts=100, prefix_caching=False),   # another workload
            throughput(4.0, prefix_aware_order=False)]
    assert comparison_lines(runs) == [
        "prefix caching on vs off, 200x2000+64/64: 8.00x (12.0 s -> 1.5 s, best of 2 and 1)",
        "prefix-aware order vs input order, 200x2000+64/64: 2.67x (4.0 s -> 1.5 s, "
        "best of 2 and 1)",
        "async scheduling vs sync, 200x2000+64/64: 0.50x (1.5 s -> 3.0 s, best of 1 and 2)"]


def _profile(**over: object) -> dict:
    p = {"of": "device kernels and copies", "steps": 16, "wall_ms_per_step": 6.1,
         "busy_ms_per_step": 5.2, "busy_fraction": 0.852,
         "categories_ms_per_step": {"gemm": 4.6, "attention": 0.3, "norm": 0.1, "rotary": 0.05,
                                    "copy": 0.04, "other": 0.01},
         "top": [{"name": "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT", "category": "gemm",
                  "ms_per_step": 2.9, "calls_per_step": 64.0}]}
    p.update(over)
    return p


def test_profiles_get_a_line_under_their_result() -> None:
    """The busy fraction quoted is the device's time against the unprofiled step where the
    result has it (latency), the profiled window's own otherwise; five categories at most."""
    latency = {"bench": "latency", "input_len": 128, "output_len": 256,
               "copy_bandwidth_gb_per_s": 4300.0,
               "results": [{"batch_size": 1, "decode_tokens_per_s": 200.0,
                            "achieved_gb_per_s": 3300.0, "fraction_of_copy_bandwidth": 0.767,
                            "ttft_ms": 21.5,
                            "profile": _profile(busy_fraction_of_timed_step=0.97)}]}
    assert result_lines(latency)[1] == (
        "  profile (device kernels and copies, 16 steps of decode): busy 5.2 ms a step = 0.97 "
        "of it; ms a step: gemm 4.6, attention 0.3, norm 0.1, rotary 0.05, copy 0.04; top "
        "nvjet_tst_64x8_64x16_4x1_v_bz_splitK_TNT 2.9 ms")
    r = throughput(30.0, profile=_profile(warmup_steps=272, top=[], step_ms={
        "seqs_per_step": 256.0, "tokens_per_step": 2048.0}))
    lines = result_lines(r)
    assert len(lines) == 2 and lines[0] == _throughput_line_of(r)
    assert lines[1] == (
        "  profile (device kernels and copies, 16 steps after 272, 256.0 seqs and 2048.0 "
        "tokens a step): busy 5.2 ms a step = 0.852 of it; ms a step: gemm 4.6, attention "
        "0.3, norm 0.1, rotary 0.05, copy 0.04")


def _throughput_line_of(r: dict) -> str:
    return result_lines({k: v for k, v in r.items() if k != "profile"})[0]


def test_a_failed_profile_says_so() -> None:
    r = throughput(30.0, profile={"error": "RuntimeError: CUPTI unavailable"})
    assert result_lines(r)[1:] == ["  profile failed: RuntimeError: CUPTI unavailable"]


def test_shared_prefix_attention_pairs_with_results_that_predate_it() -> None:
    """A result without the setting ran with it on (its default): it pairs with one that
    turned it off, and not with one of another prefix-caching setting."""
    old = throughput(2.0)                                      # no shared_prefix_attention key
    alone = throughput(6.0, shared_prefix_attention=False)
    uncached = throughput(20.0, prefix_caching=False)
    assert result_lines(alone)[0].startswith(
        "throughput 200x2000+64/64 no-shared-prefix-attention: ")
    lines = comparison_lines([old, alone, uncached])
    assert "shared-prefix attention vs each decode alone, 200x2000+64/64: 3.00x (6.0 s -> "\
        "2.0 s)" in lines
    assert "prefix caching on vs off, 200x2000+64/64: 10.00x (20.0 s -> 2.0 s)" in lines
    assert len(lines) == 2


def test_kernels_lines_name_each_op_and_the_sweeps_best() -> None:
    r = {"bench": "kernels", "ops": "triton", "model": "llama-3.1-8b", "dtype": "bfloat16",
         "copy_bandwidth_gb_per_s": 4300.0, "matmul_tflops": 788.2,
         "results": [
             {"op": "lm_head", "phase": "decode", "tokens": 1, "us": 300.1, "gb_per_s": 3500.0,
              "fraction_of_copy_bandwidth": 0.814},
             {"op": "decode_attention", "phase": "decode", "batch": 256, "context": 2048,
              "splits": 2, "us": 700.0, "gb_per_s": 3100.0, "fraction_of_copy_bandwidth": 0.721,
              "max_abs_diff_vs_torch": 0.0078},
             {"op": "extend_attention", "phase": "prefill", "seqs": 8, "prompt_len": 1024,
              "us": 900.0, "tflops": 310.5, "fraction_of_matmul_flops": 0.394}],
         "best": [
             {"op": "decode_attention", "phase": "decode", "batch": 256, "context": 2048,
              "splits": 2, "default_us": 700.0, "settings_timed": 20, "settings": 27,
              "best_launch": {"block_n": 128, "num_warps": 8}, "best_us": 560.0,
              "speedup": 1.25},
             {"op": "extend_attention", "phase": "prefill", "seqs": 8, "prompt_len": 1024,
              "default_us": 900.0, "settings_timed": 0, "settings": 54, "best_launch": None,
              "best_us": None, "speedup": None}]}
    assert result_lines(r) == [
        "kernels (triton, llama-3.1-8b bfloat16; copy 4300.0 GB/s, matmul 788.2 TFLOP/s):",
        "  lm_head (decode 1 tokens): 300.1 us, 3500.0 GB/s = 0.81 of copy",
        "  decode_attention (batch 256, context 2048, splits 2): 700.0 us, 3100.0 GB/s = 0.72 "
        "of copy, max |diff| vs torch 0.0078",
        "  extend_attention (8 x 1024 tokens): 900.0 us, 310.5 TFLOP/s = 0.39 of matmul",
        "  sweep decode_attention (batch 256, context 2048, splits 2; 20 of 27 settings timed): "
        "best block_n 128, num_warps 8: 560.0 us, 1.25x the default's 700.0 us",
        "  sweep extend_attention (8 x 1024 tokens): no setting ran"]


def test_draft_head_training_and_its_spec_run() -> None:
    train = {"train": "medusa", "num_prompts": 252, "num_positions": 29303, "generate_s": 134.0,
             "hidden_states_s": 53.7, "train_s": 196.0, "config": {"num_heads": 3},
             "epochs": [{"epoch": 1, "top1": [0.37, 0.22, 0.15]},
                        {"epoch": 3, "top1": [0.7043, 0.5386, 0.4329]}]}
    assert result_lines(train) == [
        "train medusa 3 heads on 252 prompts' answers (29303 positions), 3 epochs: top-1 "
        "0.7043, 0.5386, 0.4329 on the training answers, in 384 s"]
    distilled = {**train, "train": "hydra", "config": {"num_heads": 3, "loss": "distill"}}
    assert result_lines(distilled) == [
        "train hydra 3 heads on 252 prompts' answers (29303 positions, distilled), 3 epochs: "
        "top-1 0.7043, 0.5386, 0.4329 on the training answers, in 384 s"]
    spec = {"bench": "spec", "workload": "builtin:topics-eval",
            "speculative_config": {"method": "medusa", "num_speculative_tokens": 3},
            "results": [{"batch_size": 1, "speedup": 0.917, "outputs_identical": True,
                         "base": {"output_tokens_per_s": 22.8, "steps": 128},
                         "spec": {"output_tokens_per_s": 20.9, "steps": 81,
                                  "acceptance_rate": 0.198, "accepted_per_draft": 0.59}}]}
    assert result_lines(spec) == [
        "spec medusa k=3 builtin:topics-eval batch 1: 20.9 vs 22.8 out tok/s without drafts "
        "= 0.917x, acceptance 0.198, 0.59 accepted per draft, 128 -> 81 steps, same outputs"]
