"""`taskloom bench summary RESULTS.jsonl`: one line per benchmark result (the JSON lines the
benchmarks print), then the figures that compare two results of one file: prefix caching on
against off, prefix-aware admission order against input order, async scheduling against
synchronous, shared-prefix attention against every decode alone, each on the same workload.

A device run (benchmarks/run_gpu.sh) ends with this table, so that the figures an issue
targets are in the last lines of its output; the JSON file itself goes to
benchmarks/results/."""
from __future__ import annotations

import json
from collections.abc import Iterable


def load_results(path: str) -> list[dict]:
    """The JSON objects of a results file, one per non-empty line."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# What a result that predates a setting ran with, and how a line names one set otherwise.
_DEFAULTS = {"prefix_caching": True, "prefix_aware_order": True, "async_scheduling": False,
             "shared_prefix_attention": True}
_FLAGS = {"prefix_caching": "no-prefix-caching", "prefix_aware_order": "input-order",
          "async_scheduling": "async", "shared_prefix_attention": "no-shared-prefix-attention"}


def _setting(r: dict, key: str) -> bool:
    return bool(r.get(key, _DEFAULTS[key]))


def _workload(r: dict) -> str:
    lens = r["input_len"]
    lens = f"{lens[0]}-{lens[1]}" if isinstance(lens, list) else lens
    if r.get("shared_prefix"):
        lens = f"{r['shared_prefix']}+{r['unique_len']}"
        if r.get("num_prefixes", 1) > 1:
            lens = f"({r['num_prefixes']} prefixes){lens}"
    return f"{r['num_prompts']}x{lens}/{r['output_len']}"


def _throughput_line(r: dict) -> str:
    flags = [flag for key, flag in _FLAGS.items() if _setting(r, key) != _DEFAULTS[key]]
    if r.get("speculative_config"):
        flags.append(f"spec k={r['speculative_config']['num_speculative_tokens']} "
                     f"(acceptance {r['spec_acceptance_rate']})")
    if r.get("sliding_window"):
        w = r["sliding_window"]
        flags.append(f"window {w['size']}+{w['num_sink_tokens']} sinks")
    startup = f" (startup {r['startup_s']} s)" if "startup_s" in r else ""
    line = (f"throughput {_workload(r)}{' ' + ','.join(flags) if flags else ''}: "
            f"{r['output_tokens_per_s']:.0f} out tok/s, {r['total_tokens_per_s']:.0f} total, "
            f"{r['elapsed_s']} s{startup}, hit rate {r['prefix_cache_hit_rate']}")
    step = r.get("step_ms")
    if step:
        line += (f"; per step {step['execute']} ms in the runner ({step['wait']} waiting), "
                 f"{step['host_only']} host")
    if "peer" in r:
        on = r.get("peer_workload", {}).get("num_prompts", r["num_prompts"])
        line += f"; {r['ratio_vs_peer']}x {r['peer']['name']} (on {on} prompts)"
    return line


def _throughput_lines(r: dict) -> list[str]:
    lines = [_throughput_line(r)]
    p = r.get("profile")
    if p:
        window = "" if "error" in p else (f"after {p['warmup_steps']}, "
                                          f"{p['step_ms']['seqs_per_step']} seqs and "
                                          f"{p['step_ms']['tokens_per_step']} tokens a step")
        lines.append(profile_line(p, window))
    return lines


def profile_line(p: dict, window: str) -> str:
    """A profiled window (taskloom.bench.profile) in one indented line: how busy the device
    was, the categories by time, and the kernel that took the most."""
    if "error" in p:
        return f"  profile failed: {p['error']}"
    busy = p.get("busy_fraction_of_timed_step", p["busy_fraction"])
    cats = ", ".join(f"{c} {ms}" for c, ms in list(p["categories_ms_per_step"].items())[:5])
    top = p["top"][0] if p["top"] else None
    return (f"  profile ({p['of']}, {p['steps']} steps {window}): busy {p['busy_ms_per_step']}"
            f" ms a step = {busy} of it; ms a step: {cats}"
            + (f"; top {top['name'][:60]} {top['ms_per_step']} ms" if top else ""))


def _latency_lines(r: dict) -> list[str]:
    ratios = r.get("decode_ratio_vs_peer") or [None] * len(r["results"])
    peer = r.get("peer", {}).get("name", "the peer")
    if "weights" in r.get("peer", {}):      # llama.cpp: which weights it ran
        peer += f" on {r['peer']['weights']}"
    lines = []
    for row, ratio in zip(r["results"], ratios):
        line = (f"latency{' async' if r.get('async_scheduling') else ''} batch "
                f"{row['batch_size']} ({r['input_len']} in, {r['output_len']} "
                f"out): {row['decode_tokens_per_s']:.0f} tok/s, {row['achieved_gb_per_s']} "
                f"GB/s = {row['fraction_of_copy_bandwidth']:.2f} of a {r['copy_bandwidth_gb_per_s']}"
                f" GB/s copy, TTFT {row['ttft_ms']} ms")
        if "prefill_tflops" in row:
            line += (f" = {row['prefill_tflops']} TFLOP/s, {row['fraction_of_matmul_flops']:.2f}"
                     f" of a {r['matmul_tflops']} TFLOP/s matmul")
        lines.append(line + (f"; {ratio}x {peer}" if ratio is not None else ""))
        if "profile" in row:
            lines.append(profile_line(row["profile"], "of decode"))
    return lines


def _kernel_shape(row: dict) -> str:
    if row["op"] == "decode_attention":
        return f"batch {row['batch']}, context {row['context']}, splits {row['splits']}"
    if row["op"] == "extend_attention":
        return f"{row['seqs']} x {row['prompt_len']} tokens"
    weights = f", {row['weights']} weights" if "weights" in row else ""
    return f"{row['phase']} {row['tokens']} tokens{weights}"


def _kernels_lines(r: dict) -> list[str]:
    lines = [f"kernels ({r['ops']}, {r['model']} {r['dtype']}; copy "
             f"{r['copy_bandwidth_gb_per_s']} GB/s, matmul {r['matmul_tflops']} TFLOP/s):"]
    for row in r["results"]:
        if "gb_per_s" in row:
            rate = f"{row['gb_per_s']} GB/s = {row['fraction_of_copy_bandwidth']:.2f} of copy"
        else:
            rate = f"{row['tflops']} TFLOP/s = {row['fraction_of_matmul_flops']:.2f} of matmul"
        err = (f", max |diff| vs torch {row['max_abs_diff_vs_torch']}"
               if "max_abs_diff_vs_torch" in row else "")
        lines.append(f"  {row['op']} ({_kernel_shape(row)}): {row['us']} us, {rate}{err}")
    for b in r.get("best", []):
        if b["best_launch"] is None:
            lines.append(f"  sweep {b['op']} ({_kernel_shape(b)}): no setting ran")
            continue
        launch = ", ".join(f"{k} {v}" for k, v in b["best_launch"].items())
        lines.append(f"  sweep {b['op']} ({_kernel_shape(b)}; {b['settings_timed']} of "
                     f"{b['settings']} settings timed): best {launch}: {b['best_us']} us, "
                     f"{b['speedup']}x the default's {b['default_us']} us")
    return lines


def result_lines(r: dict) -> list[str]:
    """What one benchmark result says, in a line or a few."""
    kind = r.get("bench")
    if kind == "throughput":
        return _throughput_lines(r)
    if kind == "latency":
        return _latency_lines(r)
    if kind == "kernels":
        return _kernels_lines(r)
    if kind == "lora":
        return [f"lora {r['num_prompts']}x{r['input_len']}/{r['output_len']}, base "
                f"{r['base']['output_tokens_per_s']:.0f} out tok/s: " + ", ".join(
                    f"{x['num_loras']} adapters {x['ratio_vs_base']}x" for x in r["results"])]
    if kind == "spec":
        return _spec_lines(r)
    if kind == "window":
        return _window_lines(r)
    if kind == "snapkv":
        return _snapkv_lines(r)
    if kind == "serve":
        # tokens a chunk: above 1 when the server fell behind the engine (OutputStream)
        per_chunk = (f", {r['tokens_per_chunk']} tokens a chunk"
                     if "tokens_per_chunk" in r else "")
        return [f"serve {r['completed']}/{r['num_prompts']} at rate {r['request_rate']}: "
                f"{r['output_tokens_per_s']:.0f} out tok/s, TTFT p50 {r['ttft']['p50_ms']} "
                f"ms p99 {r['ttft']['p99_ms']}, ITL p50 {r['itl']['p50_ms']} ms{per_chunk}"]
    if r.get("train") in ("medusa", "hydra"):
        last = r["epochs"][-1]
        distilled = ", distilled" if r["config"].get("loss") == "distill" else ""
        return [f"train {r['train']} {r['config']['num_heads']} heads on {r['num_prompts']} "
                f"prompts' answers ({r['num_positions']} positions{distilled}), "
                f"{last['epoch']} epochs: top-1 "
                f"{', '.join(map(str, last['top1']))} on the training answers, in "
                f"{r['generate_s'] + r['hidden_states_s'] + r['train_s']:.0f} s"]
    return [f"{kind}: (no summary for this kind)"]


def _window_lines(r: dict) -> list[str]:
    full = r["results"][0]
    lines = []
    for x in r["results"]:
        name = "full attention" if x["window"] is None else \
            f"window {x['window']}, {x['sinks']} sinks"
        lines.append(
            f"window {r['num_texts']}x{r['context_len']} {name}: perplexity "
            f"{x['perplexity']:.3f} (past the window {x['perplexity_past_window']:.3f}), "
            f"{x['max_kv_blocks']} KV blocks ({x['max_kv_blocks'] / full['max_kv_blocks']:.2f}x "
            f"full), {x['prompt_tokens_per_s']:.0f} prompt tok/s")
    return lines


def _snapkv_lines(r: dict) -> list[str]:
    full = r["results"][0]
    lines = []
    for x in r["results"]:
        name = {"full": "full attention",
                "snapkv": f"SnapKV {x.get('budget')}, {x.get('pooling')} pool "
                          f"{x.get('kernel_size')}",
                "window": f"window {x.get('sliding_window')} + {x.get('sinks')} sinks"
                }[x["method"]]
        step = "" if x["decode_step_ms"] is None else f", {x['decode_step_ms']} ms a decode step"
        lines.append(
            f"snapkv {r['num_prompts']}x{r['context_len']} {name}: {x['found']}/"
            f"{r['num_prompts']} needles ({x['digits_right']:.0%} of digits), "
            f"{x['same_as_full']}/{r['num_prompts']} answers as full attention's, "
            f"{x['decode_kv_blocks']} KV blocks decoding "
            f"({x['decode_kv_blocks'] / max(full['decode_kv_blocks'], 1):.2f}x full){step}")
    return lines


def _spec_lines(r: dict) -> list[str]:
    c = r["speculative_config"]
    lines = []
    for x in r["results"]:
        base, spec = x["base"], x["spec"]
        same = "same outputs" if x["outputs_identical"] else "OUTPUTS DIFFER"
        lines.append(
            f"spec {c['method']} k={c['num_speculative_tokens']} {r['workload']} batch "
            f"{x['batch_size']}: {spec['output_tokens_per_s']:.1f} vs "
            f"{base['output_tokens_per_s']:.1f} out tok/s without drafts = {x['speedup']}x, "
            f"acceptance {spec['acceptance_rate']}, {spec['accepted_per_draft']} accepted "
            f"per draft, {base['steps']} -> {spec['steps']} steps, {same}")
    if "peer" in r:
        p = r["peer"]
        lines.append(f"spec batch 1 vs {p['name']} on {p['num_prompts']} prompts: "
                     f"{r['peer_taskloom']['output_tokens_per_s']:.1f} vs "
                     f"{p['output_tokens_per_s']:.1f} out tok/s = {r['ratio_vs_peer']}x"
                     f"{'' if p['outputs_identical'] else ', OUTPUTS DIFFER'}")
    return lines


_SETTINGS = {"prefix_caching": "prefix caching on vs off",
             "prefix_aware_order": "prefix-aware order vs input order",
             "async_scheduling": "async scheduling vs sync",
             "shared_prefix_attention": "shared-prefix attention vs each decode alone"}




def _paired_key(r: dict, setting: str) -> tuple:
    """What two runs must share to be compared on `setting`: the workload and the other
    settings."""
    others = tuple(_setting(r, k) for k in _SETTINGS if k != setting)
    return (r["model"], r["dtype"], r["num_prompts"], str(r["input_len"]), r["output_len"],
            r.get("shared_prefix"), r.get("num_prefixes"), r.get("unique_len"), r.get("turns"),
            others)


def comparison_lines(results: Iterable[dict]) -> list[str]:
    """Speedups between throughput results of one workload that differ in one setting; of
    repeated runs, the fastest on each side."""
    runs = [r for r in results if r.get("bench") == "throughput" and "peer" not in r]
    lines = []
    for setting, label in _SETTINGS.items():
        sides: dict[tuple, dict[bool, list[dict]]] = {}
        for r in runs:
            key = _paired_key(r, setting)
            sides.setdefault(key, {}).setdefault(_setting(r, setting), []).append(r)
        for pair in sides.values():
            if len(pair) < 2:
                continue
            on, off = (min(pair[v], key=lambda r: r["elapsed_s"]) for v in (True, False))
            best = (f", best of {len(pair[True])} and {len(pair[False])}"
                    if len(pair[True]) + len(pair[False]) > 2 else "")
            lines.append(f"{label}, {_workload(on)}: {off['elapsed_s'] / on['elapsed_s']:.2f}x "
                         f"({off['elapsed_s']} s -> {on['elapsed_s']} s{best})")
    return lines


def summarize_file(path: str) -> str:
    """The summary of a results file: a header (count, device, commit), a line or a few per
    result, then the comparisons."""
    results = load_results(path)
    if not results:
        return f"{path}: no results"
    head = results[0]
    lines = [f"{len(results)} results, {head.get('device', '?')}, commit {head.get('commit')}"]
    for r in results:
        lines += result_lines(r)
    return "\n".join(lines + comparison_lines(results))
