#!/usr/bin/env bash
# W8, long-prompt prefill (issue 67): a 3,072-token random prompt, 8 tokens out, one stream, `vllm bench serve` as
# the client of every server; the servers one after another, each alone on the machine with an 8,192-token context:
# `sagellm serve` (its default model; sagellm-int8: with --int8-activations, llama.cpp's rounding of the linears'
# inputs), vLLM-CPU and llama.cpp's server on SmolLM2's F32 and Q4_1 files as ../shared/peers/serve.sh runs them.
# Prints TTFT p50 / p99 per server and the CPU; the result files stay in OUT_DIR.
#
#   benchmarks/w8.sh OUT_DIR [SERVER...]      (servers: sagellm sagellm-int8 vllm llamacpp llamacpp-q4; default:
#                                              sagellm vllm llamacpp llamacpp-q4)
#
# Needs the peers (../shared/peers/setup.sh: vLLM's client and server, llama.cpp, the weights under $PEERS).
set -euo pipefail
out=$1; shift
servers=("${@:-sagellm vllm llamacpp llamacpp-q4}")
read -r -a servers <<<"${servers[*]}"
PEERS=${PEERS:-/tmp/peers}
SERVE=${SERVE:-/work/shared/peers/serve.sh}
PROMPTS=${PROMPTS:-5}
SEED=${SEED:-$((RANDOM * 10))}
PORT=8188
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
cpu="$(lscpu | sed -n 's/^Model name: *//p'); $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|amx)' | tr '\n' ' ')"

start() {  # NAME -> the pid of a server on $PORT, leading a session (and process group) of its own
  local command
  case $1 in
    sagellm) command=("$here/.venv/bin/sagellm" serve --port "$PORT" --no-embedding --max-model-len 8192) ;;
    sagellm-int8)
      command=("$here/.venv/bin/sagellm" serve --port "$PORT" --no-embedding --max-model-len 8192 --int8-activations)
      ;;
    vllm) command=(bash "$SERVE" vllm "$PORT" --max-model-len 8192) ;;
    llamacpp | llamacpp-q4) command=(bash "$SERVE" "$1" "$PORT" -np 1 -c 8192) ;;
  esac
  setsid "${command[@]}" >"$out/$1.log" 2>&1 &
  echo $!
}

model_of() { curl -sf "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])'; }

for name in "${servers[@]}"; do
  pid=$(start "$name")
  echo "$(date +%T) $name: starting" >&2
  for ((waited = 0; waited < 600; waited += 2)); do
    model=$(model_of 2>/dev/null) && break
    kill -0 "$pid" 2>/dev/null || { echo "$name did not start: $out/$name.log" >&2; break; }
    sleep 2
  done
  if [[ -n "${model:-}" ]]; then
    echo "$(date +%T) $name: W8, $PROMPTS prompts" >&2
    VLLM_TARGET_DEVICE=cpu "$PEERS/venv-vllm/bin/vllm" bench serve --backend openai --base-url "http://127.0.0.1:$PORT" \
      --endpoint /v1/completions --model "$model" --tokenizer "$PEERS/smollm2-hf" --dataset-name random \
      --random-input-len 3072 --random-output-len 8 --num-prompts "$PROMPTS" --max-concurrency 1 --ignore-eos \
      --temperature 0 --seed "$SEED" --percentile-metrics ttft,e2el --metric-percentiles 50,99 \
      --save-result --result-dir "$out" --result-filename "w8_$name.json" >/dev/null 2>&1 || echo "$name: client failed" >&2
  fi
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((waited = 0; waited < 120; waited++)); do  # gone, and its port free, before the next one starts
    kill -0 -- "-$pid" 2>/dev/null || curl -sf -o /dev/null "http://127.0.0.1:$PORT/v1/models" || break
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  unset model
done

echo
echo "W8: 3,072-token prompts, 8 tokens out, one stream, $PROMPTS prompts (seed $SEED)"
echo
echo "| server | TTFT p50 ms | TTFT p99 ms | completed |"
echo "|---|---|---|---|"
for name in "${servers[@]}"; do
  file="$out/w8_$name.json"
  [[ -f $file ]] || { echo "| $name | – | – | 0 |"; continue; }
  python3 -c 'import json, sys
r = json.load(open(sys.argv[1]))
print("| %s | %s | %s | %d |" % (sys.argv[2], format(r["p50_ttft_ms"], ",.0f"), format(r["p99_ttft_ms"], ",.0f"), r["completed"]))' "$file" "$name"
done
echo
echo "CPU: $cpu"
