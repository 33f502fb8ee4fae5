#!/usr/bin/env bash
# The README's peer table: W1 at 16 concurrent, W1 single stream and W3 (a warm 512-token prefix + 32 unique tokens,
# single stream) against every server running on this machine, `vllm bench serve` as the client for all of them,
# REPEATS rounds with the servers in a rotating order and a fresh seed per round and workload; then the medians,
# the CPU and a chart (`sagellm bench vllm-results`).
#
#   benchmarks/peer_table.sh OUT_DIR NAME=URL=MODEL...      (e.g. sagellm=http://127.0.0.1:8000=smollm2-135m-instruct)
#
# Needs vLLM's client (../shared/peers/setup.sh vllm installs it under $PEERS, default /tmp/peers) and the servers
# already started (`sagellm serve --no-embedding`, ../shared/peers/serve.sh vllm|llamacpp|llamacpp-q4).
set -euo pipefail
out=$1; shift
servers=("$@")
PEERS=${PEERS:-/tmp/peers}
REPEATS=${REPEATS:-3}
SEED=${SEED:-$((RANDOM * 10))}  # fresh prompts every run: vLLM's prefix cache and llama.cpp's slots remember
mkdir -p "$out"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c|amx)' | tr '\n' ' ')"

bench() {  # NAME URL MODEL SEED CONCURRENCY PROMPTS INPUT OUTPUT [extra vllm bench serve flags]
  local name=$1 url=$2 model=$3 seed=$4 concurrency=$5 prompts=$6 input=$7 output=$8; shift 8
  echo "$(date +%T) $name c$concurrency seed $seed" >&2
  VLLM_TARGET_DEVICE=cpu "$PEERS/venv-vllm/bin/vllm" bench serve --backend openai --base-url "$url" \
    --endpoint /v1/completions --model "$model" --tokenizer "$PEERS/smollm2-hf" --dataset-name random \
    --random-input-len "$input" --random-output-len "$output" --num-prompts "$prompts" \
    --max-concurrency "$concurrency" --ignore-eos --temperature 0 --seed "$seed" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 "$@" \
    --save-result --result-dir "$out" --result-filename "${name}_c${concurrency}_s${seed}.json" >/dev/null 2>&1 \
    || echo "$name failed (seed $seed)" >&2
}

for ((r = 0; r < REPEATS; r++)); do
  n=${#servers[@]}
  for ((i = 0; i < n; i++)); do  # round r starts with server r: every server goes first once in three rounds
    IFS== read -r name url model <<<"${servers[(i + r) % n]}"
    bench "$name" "$url" "$model" $((SEED + r)) 16 64 256 128
    bench "$name" "$url" "$model" $((SEED + 100 + r)) 1 8 256 128
    bench "$name-w3" "$url" "$model" $((SEED + 200 + r)) 1 16 32 16 --random-prefix-len 512
  done
done
here=$(cd "$(dirname "$0")/.." && pwd)
"${SAGELLM:-$here/.venv/bin/sagellm}" bench vllm-results "$out" --out "$out/summary"  # the checkout's, not PATH's
