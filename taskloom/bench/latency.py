"""Latency: one batch of B requests (input_len prompt tokens, output_len new tokens each) for
each batch size B; time to first token (the prefill) and decode tokens/s, with the memory
bandwidth decode achieves against the device's copy bandwidth, and the FLOP/s the prefill
achieves against a large matrix product's, both measured in the same run.

Decode must read every weight once per step (the embedding table aside: only B rows) and each
sequence's KV cache so far; bytes over time is the achieved bandwidth. Its ceiling is a large
device-to-device copy (bytes read plus bytes written over the time). The prefill must do two
FLOPs per weight of the decoder's matrices per token, the causal attention's products, and
the LM head for the one position each request samples; FLOPs over the time to first token is
its achieved rate, whose ceiling is a large square matrix product in the model's dtype."""
from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from taskloom.bench.common import (add_profile, build_llm, release_device_memory, run_info,
                                   significant, trace_path, window_fields)
from taskloom.bench.profile import profile_steps
from taskloom.bench.throughput import make_prompts, warmup_prompts
from taskloom.config import AttentionWindow
from taskloom.sampling_params import SamplingParams


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes/s of a large device copy, counting the bytes read and the bytes written."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / sorted(times)[len(times) // 2]


def matmul_flops(device: torch.device, dtype: torch.dtype, n: int | None = None,
                 repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` (n 8192 on CUDA, 1024 on a CPU), the
    median of `repeats` after a warm-up."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    torch.matmul(a, b)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times)[len(times) // 2]


def prefill_flops(model: torch.nn.Module, arch, batch: int, input_len: int) -> float:
    """FLOPs of prefilling `batch` prompts of `input_len` tokens (no cached prefix): the
    decoder's matrices for every token, the causal attention's two products, and the LM head
    for each request's last position."""
    head = getattr(model, "lm_head", None)
    head_weight = (head.weight if head is not None else model.model.embed_tokens.weight)
    matrices = sum(m.in_features * m.out_features for m in model.model.layers.modules()
                   if hasattr(m, "in_features") and hasattr(m, "out_features"))
    tokens = batch * input_len
    attention = (4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim
                 * batch * input_len * (input_len + 1) / 2)   # q.k and p.v, causal pairs
    return 2 * matrices * tokens + attention + 2 * head_weight.numel() * batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def attended_context(window: AttentionWindow | None, input_len: int, output_len: int) -> float:
    """The mean context a decode step's attention reads per sequence: half-way through the
    output, or under a sliding window, the mean over the steps of what the window and its
    sinks let each one see."""
    if window is None:
        return input_len + output_len / 2
    steps = range(input_len + 1, input_len + output_len)     # context of each decode step
    seen = [window.size + min(window.num_sink_tokens, n - window.size)
            if n > window.size else n for n in steps]
    return sum(seen) / max(len(seen), 1)


def decode_bytes_per_step(model: torch.nn.Module, kv_bytes_per_token: int, batch: int,
                          context: float) -> float:
    """Bytes one decode step must read: every weight except the unused embedding rows, plus
    the KV cache of `batch` sequences of `context` tokens. Where a small-batch head holding
    a copy of the lm head (kept 8-bit) takes the batch's logits, it is read instead."""
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    row = embed[0].numel() * embed.element_size()
    tied = getattr(model, "lm_head", None) is None
    if not tied:  # the input embedding reads only the batch's rows
        weights -= embed.numel() * embed.element_size() - batch * row
    small = getattr(model, "small_batch_head", None)
    if small is not None and small.holds_copy and batch <= small.max_rows:
        head = model.lm_head_weight()
        weights += small.nbytes - head.numel() * head.element_size() + \
            (batch * row if tied else 0)
    return weights + batch * context * kv_bytes_per_token


def _time_batch(llm, prompts: list[list[int]], output_len: int, device: torch.device
                ) -> tuple[float, float]:
    """(seconds to the first token of every request, seconds of the decode after it)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [f"lat-{i}" for i in range(len(prompts))]
    _sync(device)
    t0 = time.perf_counter()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    started: set[str] = set()
    t_first = None
    while engine.has_unfinished:
        for out in engine.step():
            started.add(out.request_id)
        if t_first is None and len(started) == len(ids):
            _sync(device)
            t_first = time.perf_counter()
    _sync(device)
    t_end = time.perf_counter()
    return t_first - t0, t_end - t_first


def _profile_batch(llm, prompts: list[list[int]], a: argparse.Namespace, device: torch.device
                   ) -> dict:
    """The profile of `--profile-steps` decode steps of the batch (run again after the timed
    run: its prompts are cached by then, which shortens the prefill, not the decode)."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    ids = [f"lat-profile-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, p, params)
    try:
        started: set[str] = set()
        while len(started) < len(ids) and engine.has_unfinished:
            for out in engine.step():
                started.add(out.request_id)
        path = trace_path(a, f"latency-batch{len(prompts)}")
        return profile_steps(engine, min(a.profile_steps, a.output_len - 1), device, path)
    finally:
        for rid in ids:
            engine.abort(rid)
        engine.step()           # takes in a step still in flight (async scheduling)


def _row_profile(llm, a: argparse.Namespace, batch_size: int, row: dict,
                 device: torch.device) -> dict:
    profile = _profile_batch(llm, _batch_prompts(a, batch_size, llm.engine.vocab_size), a,
                             device)
    # the device's busy time against the unprofiled step: the profiler's host overhead is in
    # its own window's wall time, not in the kernels' durations
    profile["busy_fraction_of_timed_step"] = round(
        profile["busy_ms_per_step"] / row["decode_ms_per_step"], 3)
    return profile


def _batch_prompts(a: argparse.Namespace, batch_size: int, vocab: int) -> list[list[int]]:
    """The prompts of one batch size, sharing no block with another batch's (else the prefix
    cache would serve them and flatter the time to first token)."""
    return make_prompts(batch_size, a.input_len, None, vocab, a.dataset_seed + 7919 * batch_size)


def run_latency(a: argparse.Namespace) -> dict:
    if a.speculative_config is not None:
        raise ValueError("bench latency times one token per decode step (its bandwidth is "
                         "per token); measure speculative decoding with bench spec")
    llama_cpp_tool = None
    if a.peer == "llama.cpp":      # refused before the run, not after it
        from taskloom.bench.llama_cpp import check_llama_cpp_peer
        llama_cpp_tool = check_llama_cpp_peer(a)
    llm, startup_s = build_llm(a)
    device = torch.device(a.device)
    runner = llm.engine.runner
    kv_per_token = llm.engine.runner.arch.kv_bytes_per_token(runner.kv_caches[0].element_size())
    bandwidth = copy_bandwidth(device)
    peak_flops = matmul_flops(device, runner.kv_caches[0].dtype)
    vocab = llm.engine.vocab_size
    rows = []
    for b in a.batch_sizes:
        prompts = _batch_prompts(a, b, vocab)
        _time_batch(llm, warmup_prompts(vocab, a.dataset_seed)[:1], 4, device)  # warm-up
        times0 = dataclasses.replace(llm.engine.step_times)
        prefill_s, decode_s = _time_batch(llm, prompts, a.output_len, device)
        step_ms = llm.engine.step_times.since(times0).per_step_ms()
        steps = a.output_len - 1
        per_step = decode_bytes_per_step(llm.engine.runner.model, kv_per_token, b,
                                         attended_context(runner.window, a.input_len,
                                                          a.output_len))
        achieved = per_step * steps / decode_s
        flops = prefill_flops(runner.model, runner.arch, b, a.input_len) / prefill_s
        rows.append({
            "batch_size": b, "ttft_ms": round(1000 * prefill_s, 2),
            "prefill_tflops": significant(flops / 1e12),
            "fraction_of_matmul_flops": significant(flops / peak_flops),
            "decode_ms_per_step": round(1000 * decode_s / steps, 3),
            "decode_tokens_per_s": round(b * steps / decode_s, 2),
            "achieved_gb_per_s": round(achieved / 1e9, 2),
            "fraction_of_copy_bandwidth": round(achieved / bandwidth, 3),
            "step_ms": step_ms})
    result = {"bench": "latency", "model": a.model or "embedded:SmolLM2-135M-Instruct",
              "random_weights": a.random_weights, "dtype": a.dtype,
              "quantization": a.quantization, "input_len": a.input_len,
              "output_len": a.output_len, "async_scheduling": a.async_scheduling,
              "sliding_window": window_fields(llm),
              "copy_bandwidth_gb_per_s": round(bandwidth / 1e9, 1),
              "matmul_tflops": significant(peak_flops / 1e12),
              "startup_s": startup_s, "results": rows, **run_info(a.device)}
    if a.profile:
        for b, row in zip(a.batch_sizes, rows):
            add_profile(result, row, a, lambda b=b, row=row: _row_profile(llm, a, b, row, device))
    if a.peer is not None:
        del llm, runner
        release_device_memory(a.device)
        result["peer"] = _run_peer(a, vocab, llama_cpp_tool)
        result["decode_ratio_vs_peer"] = [
            round(r["decode_tokens_per_s"] / p["decode_tokens_per_s"], 3)
            if p["decode_tokens_per_s"] else None
            for r, p in zip(rows, result["peer"]["results"])]
    return result


def _run_peer(a: argparse.Namespace, vocab: int, llama_cpp_tool: str | None) -> dict:
    """The same batches through the peer: HF `generate`, or llama.cpp's batched benchmark
    with as many threads as torch used."""
    if a.peer == "llama.cpp":
        from taskloom.bench.llama_cpp import llama_cpp_latency
        return llama_cpp_latency(a, llama_cpp_tool, torch.get_num_threads())
    from taskloom.bench.peers import hf_generate_latency
    batches = [_batch_prompts(a, b, vocab) for b in a.batch_sizes]
    return {"name": "hf-transformers-generate", "results": hf_generate_latency(a, batches)}
