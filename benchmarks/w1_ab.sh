#!/usr/bin/env bash
# W1-c16 (64 prompts, 256 tokens in, 128 out, 16 at a time) through every server running on this machine, each as it
# is and with BODY added to every request, `vllm bench serve` as the client for all of them (`--extra-body`), REPEATS
# rounds with the servers in a rotating order and fresh prompts for every run; then the medians (`sagellm bench
# vllm-results`, rows NAME and NAME-SUFFIX) and the CPU. What a feature costs, measured beside a peer in one run:
# structured_output.sh and penalties.sh call it.
#
#   benchmarks/w1_ab.sh OUT_DIR SUFFIX BODY TITLE NAME=URL=MODEL...
#
# Needs vLLM's client (../shared/peers/setup.sh vllm) and the servers already started (`sagellm serve
# --no-embedding`, ../shared/peers/serve.sh vllm).
set -euo pipefail
out=$1 suffix=$2 body=$3 title=$4; shift 4
servers=("$@")
PEERS=${PEERS:-/tmp/peers}
REPEATS=${REPEATS:-2}
SEED=${SEED:-$((RANDOM * 10))}
mkdir -p "$out"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c|amx)' | tr '\n' ' ')"

bench() {  # NAME URL MODEL SEED [extra vllm bench serve flags]
  local name=$1 url=$2 model=$3 seed=$4; shift 4
  echo "$(date +%T) $name seed $seed" >&2
  VLLM_TARGET_DEVICE=cpu "$PEERS/venv-vllm/bin/vllm" bench serve --backend openai --base-url "$url" \
    --endpoint /v1/completions --model "$model" --tokenizer "$PEERS/smollm2-hf" --dataset-name random \
    --random-input-len 256 --random-output-len 128 --num-prompts 64 --max-concurrency 16 --ignore-eos \
    --temperature 0 --seed "$seed" --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 "$@" \
    --save-result --result-dir "$out" --result-filename "${name}_c16_s${seed}.json" >"$out/${name}_s${seed}.log" 2>&1 \
    || echo "$name failed (seed $seed): $out/${name}_s${seed}.log" >&2
}

for ((r = 0; r < REPEATS; r++)); do
  n=${#servers[@]}
  for ((i = 0; i < n; i++)); do
    IFS== read -r name url model <<<"${servers[(i + r) % n]}"
    # Fresh prompts for each run (a server's prefix cache would serve the second run's from the first's), and the
    # two kinds in turns first, so neither always follows the other.
    if ((r % 2 == 0)); then
      bench "$name" "$url" "$model" $((SEED + 2 * r))
      bench "$name-$suffix" "$url" "$model" $((SEED + 2 * r + 1)) --extra-body "$body"
    else
      bench "$name-$suffix" "$url" "$model" $((SEED + 2 * r)) --extra-body "$body"
      bench "$name" "$url" "$model" $((SEED + 2 * r + 1))
    fi
  done
done
"${SAGELLM:-sagellm}" bench vllm-results "$out" --out "$out/summary" --title "$title"
