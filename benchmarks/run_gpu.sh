#!/usr/bin/env bash
# One device run (H100): the gpu-marked tests, then the latency and throughput benchmarks with
# the Llama-3.1-8B shape in bf16 (random weights) and their HF peers, the shared-prefix and
# multi-LoRA benchmarks. Results land in $OUT.
# Usage on the device machine, from the repo root:
#   bash benchmarks/run_gpu.sh [tests|bench|long|random|prefix|lora|serve|all]
# `random` (the issue's 25x target against HF generate_batch) runs the peer for about 5 minutes:
# give it a call of its own. `serve` (not in `all`) starts `taskloom serve` with the same shape
# and runs `bench serve --token-ids` against it; the device image lacks the HTTP stack, so it
# needs the wheels in .whl (fastapi, starlette, uvicorn, pydantic and their needs) carried.
# SHAPE may be overridden to dry-run a mode on a CPU with a tiny config.
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
SHAPE=${SHAPE:-"--random-weights --model llama-3.1-8b --device cuda --dtype bfloat16 --max-model-len 4096"}

if [ "$what" = tests ] || [ "$what" = all ]; then
  # tests/server needs the HTTP stack, which the GPU image lacks; the gpu tests live here.
  timeout 300 python3 -m pytest -q -m gpu tests/ops tests/e2e -p no:cacheprovider -s -rfEs \
    --durations=8 --log-file="$OUT/gpu_tests_info.log" --log-file-level=INFO \
    > "$OUT/gpu_tests.log" 2>&1
  echo "gpu tests exit $?"
  grep -E "GPU-FIDELITY|passed|failed|Error|FAILED|SKIPPED" "$OUT/gpu_tests.log" | tail -15
  grep -iE "captur|KV cache|kv pool|graph" "$OUT/gpu_tests_info.log" | tail -6
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  timeout 240 python3 -m taskloom.cli bench latency $SHAPE --batch-sizes 1 8 64 \
    --input-len 128 --output-len 256 --peer hf --output-json "$OUT/latency_llama8b.json" \
    2>&1 | grep -v "it/s" | tail -6
  timeout 240 python3 -m taskloom.cli bench throughput $SHAPE --num-prompts 1000 \
    --input-len 256 --output-len 256 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --output-json "$OUT/throughput_llama8b_256_256.json" 2>&1 | grep -v "it/s" | tail -2
  timeout 240 python3 -m taskloom.cli bench throughput $SHAPE --num-prompts 1000 \
    --input-len 256 --output-len 256 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --async-scheduling --output-json "$OUT/throughput_llama8b_256_256_async.json" 2>&1 \
    | grep -v "it/s" | tail -1
fi
if [ "$what" = long ] || [ "$what" = all ]; then
  timeout 300 python3 -m taskloom.cli bench throughput $SHAPE --num-prompts 1000 \
    --input-len 1024 --output-len 1024 --max-num-seqs 256 --max-num-batched-tokens 8192 \
    --output-json "$OUT/throughput_llama8b_1024_1024.json" 2>&1 | grep -v "it/s" | tail -1
fi
if [ "$what" = random ]; then
  timeout 580 python3 -m taskloom.cli bench throughput $SHAPE --num-prompts 512 \
    --input-len-range 32 1024 --output-len 256 --max-num-seqs 256 \
    --max-num-batched-tokens 8192 --peer hf \
    --output-json "$OUT/throughput_llama8b_random_vs_hf.json" 2>&1 | grep -v "it/s" | tail -1
fi
if [ "$what" = prefix ] || [ "$what" = all ]; then
  for flag in "" --no-prefix-caching; do
    timeout 240 python3 -m taskloom.cli bench throughput $SHAPE --num-prompts 200 \
      --shared-prefix 2000 --unique 64 --output-len 64 $flag \
      --output-json "$OUT/prefix_llama8b${flag:+_off}.json" 2>&1 | grep -v "it/s" | tail -1
  done
fi
if [ "$what" = lora ] || [ "$what" = all ]; then
  timeout 400 python3 -m taskloom.cli bench lora $SHAPE --num-loras 1 8 64 512 \
    --num-prompts 512 --input-len 128 --output-len 128 --max-num-seqs 256 --max-loras 64 \
    --output-json "$OUT/lora_llama8b.json" 2>&1 | grep -v "it/s" | tail -6
fi
if [ "$what" = serve ]; then
  port=8011
  python3 -m taskloom.cli serve $SHAPE --max-num-seqs 256 --port $port \
    > "$OUT/serve_server.log" 2>&1 &
  server=$!
  python3 - "$port" <<'PY' || { echo "server did not come up"; tail -20 "$OUT/serve_server.log"; }
import sys, time, httpx
for _ in range(240):
    try:
        if httpx.get(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(1)
sys.exit(1)
PY
  for rate in inf 16; do
    timeout 300 python3 -m taskloom.cli bench serve --base-url http://127.0.0.1:$port \
      --token-ids --num-prompts ${SERVE_PROMPTS:-512} --input-len 256 --output-len 256 --request-rate $rate \
      --output-json "$OUT/serve_llama8b_rate_$rate.json" 2>&1 | tail -6
  done
  kill -TERM $server; wait $server
  grep -iE "KV cache|captured|error" "$OUT/serve_server.log" | tail -5
fi
