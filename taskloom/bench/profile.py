"""Where a benchmark's steps spend their time (`--profile`): a window of engine steps under
torch.profiler, summarised into what a device run must bring back when a target is missed.

On CUDA the profile is the device's: every kernel, copy and memset the steps ran (CUDA-graph
replays included: the tracer records the kernels inside a graph), summed by name and by
category (GEMM, attention, norm, ...), and the fraction of the window's wall time the device
was busy at all. A busy fraction well under 1 says the device waited for the host; the
categories say which kernels to make faster when it is near 1. On the CPU the same summary
is made of the operators' self times (the time in an operator less that in the operators it
called; our C kernels' calls count as operators), and the busy fraction is the share of the
wall time inside any operator: the rest is Python.

The trace is read from the Chrome-trace JSON the profiler exports, whose shape (`traceEvents`
of complete events with a `cat` of `kernel`, `gpu_memcpy`, `gpu_memset` or `cpu_op`) has
held across torch versions, rather than from the profiler's Python event objects, whose
fields have not.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterable

import torch

from taskloom.ops.cpu_kernels import PROFILE_PREFIX

# (category, pattern on the kernel or operator name): the first that matches names it. Our
# Triton kernels by their function names; cuBLAS/CUTLASS GEMMs by theirs (nvjet, xmma,
# cutlass, gemm); torch's CPU operators by their aten names, oneDNN's packed linears
# (taskloom.ops.linear) and the 4-bit kernel (taskloom.ops.int4_linear) by theirs, our C
# kernels (taskloom.ops.cpu_kernels, .small_linear) by their functions'.
CATEGORIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(pattern, re.IGNORECASE)) for name, pattern in (
        ("lora", r"segment_matmul|lora|sgmv|bgmv"),
        ("kv_write", r"write_kv|reshape_and_cache"),
        ("attention", r"decode_split|decode_reduce|extend_kernel|attention|attn|flash|fmha"),
        ("norm", r"rms_norm|rmsnorm|layer_norm"),
        ("rotary", r"rotary|rope"),
        ("activation", r"silu|gelu|swiglu"),
        ("gemm", r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitk|aten::(mm|addmm|bmm|matmul|"
                 r"linear|baddbmm)$|mkldnn::_linear_pointwise|int4pack_mm|linear_bf16"),
        ("sampling", r"argmax|arg_max|topk|sort|softmax|multinomial|exponential|cumsum"),
        ("copy", r"memcpy|memset|copy|aten::(cat|index|index_select|index_copy_|gather|"
                 r"scatter|to|_to_copy|contiguous|clone|fill_|zero_)$"),
        ("elementwise", r"elementwise|aten::(add|mul|sub|div|neg|exp|pow|rsqrt|where)_?$"),
    ))

_DEVICE_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def category(name: str) -> str:
    for cat, pattern in CATEGORIES:
        if pattern.search(name):
            return cat
    return "other"


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals (overlaps counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def self_times(ops: list[dict]) -> list[tuple[str, float]]:
    """(name, self time) of nested operator events (one thread's or several): an event's
    duration less its direct children's, children being the events inside it on its thread."""
    out: list[tuple[str, float]] = []
    by_thread: dict[tuple, list[dict]] = {}
    for e in ops:
        by_thread.setdefault((e.get("pid"), e.get("tid")), []).append(e)
    for events in by_thread.values():
        events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []          # [end, name, self time]
        done: list[list] = []
        for e in events:
            start, end = e["ts"], e["ts"] + e["dur"]
            while stack and stack[-1][0] <= start + 1e-3:
                done.append(stack.pop())
            if stack:
                stack[-1][2] -= min(end, stack[-1][0]) - start
            stack.append([end, e["name"], e["dur"]])
        done.extend(stack)
        out.extend((name, max(t, 0.0)) for _, name, t in done)
    return out


def summarize_trace(trace: dict, steps: int, wall_s: float, on_device: bool,
                    top: int = 12) -> dict:
    """The profile summary of an exported trace of `steps` steps that took `wall_s`: per step,
    milliseconds by category and for the `top` names that took the most, and the fraction of
    the wall time the device (or, on the CPU, any operator) was busy."""
    events = [e for e in trace.get("traceEvents", [])
              if e.get("ph") == "X" and "dur" in e and "ts" in e]
    if on_device:
        timed = [e for e in events if e.get("cat") in _DEVICE_CATS]
        named = [(e["name"], float(e["dur"])) for e in timed]
    else:
        timed = [e for e in events if e.get("cat") == "cpu_op" or (
            e.get("cat") == "user_annotation" and e["name"].startswith(PROFILE_PREFIX))]
        named = self_times(timed)
    busy_us = union_length((e["ts"], e["ts"] + e["dur"]) for e in timed)
    n = max(steps, 1)
    per_name: dict[str, list[float]] = {}
    for name, us in named:
        acc = per_name.setdefault(name, [0.0, 0])
        acc[0] += us
        acc[1] += 1
    cats: dict[str, float] = {}
    for name, (us, _) in per_name.items():
        cats[category(name)] = cats.get(category(name), 0.0) + us
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])
    wall_ms = 1000 * wall_s / n
    return {
        "of": "device kernels and copies" if on_device else "cpu operators (self time)",
        "steps": steps,
        "wall_ms_per_step": round(wall_ms, 3),
        "busy_ms_per_step": round(busy_us / 1000 / n, 3),
        "busy_fraction": round(busy_us / 1e6 / wall_s, 3) if wall_s > 0 else None,
        "categories_ms_per_step": {c: round(us / 1000 / n, 3)
                                   for c, us in sorted(cats.items(), key=lambda kv: -kv[1])},
        "top": [{"name": name[:160], "category": category(name),
                 "ms_per_step": round(us / 1000 / n, 4), "calls_per_step": round(calls / n, 2)}
                for name, (us, calls) in ranked[:top]],
    }


def profile_steps(engine, steps: int, device: torch.device,
                  trace_path: str | None = None) -> dict:
    """Run up to `steps` engine steps (fewer if its requests finish first) under the profiler
    and summarise the trace (`summarize_trace`); the device is synchronised before and after,
    so the window's wall time holds all of its device work. `trace_path` keeps the Chrome
    trace (for Perfetto). The profiler's own host time per operator is in the window's wall
    time: compare `busy_ms_per_step` with an unprofiled run's step time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    done = 0
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        while done < steps and engine.has_unfinished:
            engine.step()
            done += 1
        if cuda:
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    path = trace_path
    if path is None:
        fd, path = tempfile.mkstemp(suffix=".json", prefix="taskloom-trace-")
        os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            trace = json.load(f)
    finally:
        if trace_path is None:
            os.unlink(path)
    return summarize_trace(trace, done, wall, cuda)
