#!/usr/bin/env bash
# The device run, sized to a lease of 15 minutes of device time on one H100 or H200 (machine
# start, transfers and idle time included): the stages below in order of what the open issues
# need most, each under a time cap, until BUDGET_S seconds are spent. A stage that no longer
# fits is skipped and named in the summary, so a second call can run just those.
#
# Usage on the device machine, from the repo root (the device tool's `run`, timeout_s 600):
#   bash benchmarks/run_gpu.sh                 # every stage but serve, in order, in BUDGET_S
#   BUDGET_S=200 bash benchmarks/run_gpu.sh random async     # named stages only, in order
#
# Stages (cap in seconds): smoke (60) the engine on the GPU at all: a small shape in bf16,
# Triton kernels and CUDA graphs; if it fails, only `tests` runs after it, for the
# diagnosis. tests (180) the gpu-marked tests: kernels against the torch reference, CUDA
# graphs, greedy fidelity to HF. Then the Llama-3.1-8B shape in bf16, random weights:
# latency (150) batches 1/8/64, 128 in, 256 out, vs HF generate. throughput (100) 1,000 x
# 256/256. prefix (180) 200 x (2,000 shared + 64 unique, 64 out): prefix caching on, on with
# every decode attending alone (--no-shared-prefix-attention), then caching off.
# random (200) 512 x (32-1024 in, 256 out); the HF generate_batch peer (about 435 output tok/s
# on an H100) runs a 128-prompt workload of the same distribution, which taskloom runs too.
# kernels (120) each op of a layer alone at the 8B shapes (batches 1/64/256, contexts 512 and
# 2048, an 8,192-token prefill chunk): GB/s or TFLOP/s against the copy and matmul ceilings,
# error against the torch reference, and a sweep of the attention kernels' launch settings.
# async (100) 256/256 with --async-scheduling. latency_async (60) batches 1 and 64 with
# --async-scheduling. lora (160) 1/8/64 adapters vs the base.
# long (200) 256 x 1024/1024. serve (300; only when named) taskloom serve with the 8B shape
# and bench serve --token-ids against it (512 x 256/256, all at once and 16 a second), with
# the engine in its own process and then in a thread; the device image lacks the HTTP stack,
# so carry .whl (bash benchmarks/fetch_device_wheels.sh fetches it).
#
# What comes back ($OUT, at most 8 files): results.jsonl (every benchmark's JSON line, with
# device, commit, date and command, and for latency, throughput, prefix, random and long a
# profile of 16 steps: kernels by category and name, device busy fraction), run.log (all the
# stages' output), gpu_tests.log, traces.tgz (those profiles' Chrome traces, for Perfetto),
# and serve_server.log and serve-thread_server.log for serve. The summary table is printed
# last. Commit results.jsonl as benchmarks/results/DATE-DEVICE.jsonl, and quote the
# summary's lines with their commands.
# SHAPE and SMOKE_SHAPE may be overridden to dry-run the script on a CPU with a tiny config.
set -uo pipefail
OUT=${OUT:-/tmp/out}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
LOG=$OUT/run.log
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
SHAPE=${SHAPE:-"--random-weights --model llama-3.1-8b --device cuda --dtype bfloat16 --max-model-len 4096"}
SMOKE_SHAPE=${SMOKE_SHAPE:-"--random-weights --model smollm2-135m --device cuda --dtype bfloat16"}
KERNELS=${KERNELS:-"--model llama-3.1-8b --device cuda --dtype bfloat16 --max-model-len 4096 --sweep"}
BATCH="--max-num-seqs 256 --max-num-batched-tokens 8192"
# after each timed run, 16 steps of the workload under torch.profiler: where the time went
# (kernels by category, device busy fraction) in the result, the Chrome traces in traces.tgz
TRACES=/tmp/traces
mkdir -p $TRACES
PROFILE="--profile --profile-dir /tmp/new_traces"     # bench() files them by stage
TL="python3 -m taskloom.cli --log-level INFO"   # INFO: load, KV pool and graph-capture times
{ nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.mem \
    --format=csv,noheader 2>&1; git log -1 --format='commit %h %s' 2>&1
  python3 -c 'import torch, triton, transformers; print("torch", torch.__version__,
    "triton", triton.__version__, "transformers", transformers.__version__)' 2>&1
} | tee -a "$LOG"

start=$SECONDS
status=()          # "stage: ok|FAILED (rc)|skipped|..., seconds"
smoke_failed=0

# bench NAME ARGS...: one taskloom benchmark; its JSON line is appended to results.jsonl.
bench() {
  local name=$1; shift
  echo "== $name: $TL $*" >> "$LOG"
  timeout -k 10 "$cap" $TL "$@" --output-json /tmp/stage.json >> "$LOG" 2>&1
  local rc=$?
  for t in /tmp/new_traces/*.json; do [ -e "$t" ] && mv "$t" "$TRACES/$name-${t##*/}"; done
  [ -s /tmp/stage.json ] && { cat /tmp/stage.json >> "$RESULTS"; rm -f /tmp/stage.json; }
  return $rc
}

stage_smoke() {
  bench smoke bench throughput $SMOKE_SHAPE --num-prompts 32 --input-len 96 \
    --output-len 32 --max-num-seqs 32
}
stage_tests() {
  # tests/server needs the HTTP stack, which the device image lacks; the gpu tests live here,
  # beside CPU test modules that import gguf or pydantic (not collected there, not stopping it)
  timeout -k 10 "$cap" python3 -m pytest -q -m gpu tests/ops tests/e2e -p no:cacheprovider -s \
    --continue-on-collection-errors \
    -rfEs --durations=10 > "$OUT/gpu_tests.log" 2>&1
  local rc=$?
  grep -E "GPU-FIDELITY|passed|failed|FAILED|ERROR" "$OUT/gpu_tests.log" | tail -12 >> "$LOG"
  # the collection errors of those CPU modules make pytest's status 1: the counts tell
  note=$(tail -1 "$OUT/gpu_tests.log")
  return $rc
}
stage_latency() {
  bench latency bench latency $SHAPE --batch-sizes 1 8 64 --input-len 128 --output-len 256 \
    --peer hf $PROFILE
}
stage_throughput() {
  bench throughput bench throughput $SHAPE --num-prompts 1000 --input-len 256 \
    --output-len 256 $BATCH $PROFILE
}
stage_prefix() {
  local cap=$((cap / 3))     # three runs share the stage's cap
  bench prefix-on bench throughput $SHAPE --num-prompts 200 --shared-prefix 2000 \
    --unique 64 --output-len 64 $BATCH $PROFILE || return $?
  bench prefix-alone bench throughput $SHAPE --num-prompts 200 --shared-prefix 2000 \
    --unique 64 --output-len 64 $BATCH --no-shared-prefix-attention || return $?
  bench prefix-off bench throughput $SHAPE --num-prompts 200 --shared-prefix 2000 \
    --unique 64 --output-len 64 $BATCH --no-prefix-caching
}
stage_random() {
  bench random bench throughput $SHAPE --num-prompts 512 --input-len-range 32 1024 \
    --output-len 256 $BATCH --peer hf --peer-num-prompts 128 $PROFILE
}
stage_kernels() {
  # the sweep stops in time for the JSON line: about a minute goes to the ops at their
  # defaults (compiling them, the weights, the references)
  bench kernels bench kernels $KERNELS --sweep-budget $(( cap > 80 ? cap - 60 : 20 ))
}
stage_async() {
  bench async bench throughput $SHAPE --num-prompts 1000 --input-len 256 --output-len 256 \
    $BATCH --async-scheduling
}
stage_latency_async() {
  # batch 1 against the 90 % bandwidth target with the host's share of each step hidden
  bench latency-async bench latency $SHAPE --batch-sizes 1 64 --input-len 128 \
    --output-len 256 --async-scheduling
}
stage_lora() {
  bench lora bench lora $SHAPE --num-loras 1 8 64 --num-prompts 512 --input-len 128 \
    --output-len 128 --max-num-seqs 256 --max-loras 64 --repeats 1
}
stage_long() {
  bench long bench throughput $SHAPE --num-prompts 256 --input-len 1024 --output-len 1024 \
    $BATCH $PROFILE
}
# serve_with NAME FLAGS RATES: taskloom serve (the shape, FLAGS) and bench serve against it at
# each request rate; the server's log is $OUT/NAME_server.log.
serve_with() {
  local name=$1 flags=$2 rates=$3 port=8011 rc=0
  $TL serve $SHAPE --max-num-seqs 256 --port $port $flags > "$OUT/${name}_server.log" 2>&1 &
  local server=$!
  python3 - "$port" <<'PY' || { echo "server did not come up" >> "$LOG"; rc=1; }
import sys, time, httpx
for _ in range(150):
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(1)
sys.exit(1)
PY
  if [ $rc = 0 ]; then
    for rate in $rates; do
      bench "$name-rate-$rate" bench serve --base-url "http://127.0.0.1:$port" --token-ids \
        --num-prompts "${SERVE_PROMPTS:-512}" --input-len 256 --output-len 256 \
        --request-rate $rate || rc=$?
    done
  fi
  kill -TERM $server; wait $server
  return $rc
}
stage_serve() {
  local rc=0 cap=$((cap / 4))     # four benchmark runs (and two starts) share the stage's cap
  python3 -c "import fastapi, uvicorn, pydantic" 2>/dev/null || {
    echo "serve needs the HTTP stack: run benchmarks/fetch_device_wheels.sh here first and" \
         "carry .whl" | tee -a "$LOG"; return 1; }
  # the engine in its own process (the default), then in a thread of the server's process
  serve_with serve "" "inf 16" || rc=$?
  serve_with serve-thread --no-engine-process "inf 16" || rc=$?
  return $rc
}

declare -A CAP=([smoke]=60 [tests]=180 [latency]=150 [throughput]=100 [prefix]=180
                [random]=200 [kernels]=120 [async]=100 [latency_async]=60 [lora]=160
                [long]=200 [serve]=300)
stages=("$@")
[ ${#stages[@]} = 0 ] && stages=(smoke tests latency throughput prefix random kernels async
                                 latency_async lora long)
for s in "${stages[@]}"; do
  [ -n "${CAP[$s]:-}" ] || { echo "unknown stage $s (one of ${!CAP[*]})"; exit 2; }
done

for s in "${stages[@]}"; do
  left=$((BUDGET_S - (SECONDS - start)))
  # a stage starts only with two thirds of its cap left: most finish well inside it
  if [ "$left" -lt $((CAP[$s] * 2 / 3)) ]; then status+=("$s: skipped (${left}s left)"); continue; fi
  if [ $smoke_failed = 1 ] && [ "$s" != tests ]; then status+=("$s: skipped (smoke failed)"); continue; fi
  cap=$(( left < CAP[$s] ? left : CAP[$s] ))
  t0=$SECONDS
  note=""
  "stage_$s"
  rc=$?
  case $rc in
    0) what=ok ;; 124|137) what="TIMED OUT at ${cap}s" ;; *) what="FAILED (rc $rc)" ;;
  esac
  [ "$s" = smoke ] && [ $rc != 0 ] && smoke_failed=1
  status+=("$s: $what, $((SECONDS - t0))s${note:+ ($note)}")
  echo "-- ${status[-1]}" | tee -a "$LOG"
done

echo; echo "== errors (last lines of the log that name one)"
grep -E "Error|error:|Traceback" "$LOG" | tail -8
echo; echo "== stages ($((SECONDS - start))s of $BUDGET_S)"; printf '%s\n' "${status[@]}"
# the traces, compressed, if they fit what a device run brings back (16 MiB a file)
if compgen -G "$TRACES/*.json" > /dev/null; then
  tar -C "$TRACES" -czf /tmp/traces.tgz . && size=$(stat -c %s /tmp/traces.tgz)
  if [ "${size:-0}" -lt $((15 * 1024 * 1024)) ]; then mv /tmp/traces.tgz "$OUT/traces.tgz"
  else echo "traces.tgz is $size bytes: left out"; fi
fi
echo; [ -s "$RESULTS" ] && $TL bench summary "$RESULTS"
