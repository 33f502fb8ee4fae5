#!/usr/bin/env bash
# Does our load generator (`sagellm bench serve`) read the same numbers as vLLM's (`vllm bench serve`) on every
# server? W1 at 16 concurrent (64 random 256-token prompts, 128 tokens, ignore_eos, greedy), each server measured by
# both clients one after the other, ROUNDS rounds with fresh seeds; each client's own CPU seconds beside its figures
# (on 2 cores a client that eats CPU slows the server it measures).
#
#   benchmarks/client_agreement.sh OUT_DIR NAME=URL=MODEL...
#
# Needs vLLM's client (../shared/peers/setup.sh vllm installs it under $PEERS, default /tmp/peers) and the servers
# already started. Prints one line per (server, client, round): out tok/s, TTFT p50, TPOT p50, and the client's CPU
# seconds (its start, imports and tokenizer included, for both clients). (The copies in results/client_agreement
# keep each run's summary, not its per-request records.)
set -euo pipefail
out=$1; shift
PEERS=${PEERS:-/tmp/peers}
ROUNDS=${ROUNDS:-2}
SEED=${SEED:-$((RANDOM * 10))}
SAGELLM=${SAGELLM:-sagellm}
mkdir -p "$out"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|amx)' | tr '\n' ' ')"
cpu_of() { awk '{print $1 + $2}' "$1"; }  # user + system seconds that /usr/bin/time wrote

for ((r = 0; r < ROUNDS; r++)); do
  for server in "$@"; do
    IFS== read -r name url model <<<"$server"
    seed=$((SEED + r))
    /usr/bin/time -f '%U %S' -o "$out/${name}_vllm_$r.cpu" env VLLM_TARGET_DEVICE=cpu "$PEERS/venv-vllm/bin/vllm" \
      bench serve --backend openai --base-url "$url" --endpoint /v1/completions --model "$model" \
      --tokenizer "$PEERS/smollm2-hf" --dataset-name random --random-input-len 256 --random-output-len 128 \
      --num-prompts 64 --max-concurrency 16 --ignore-eos --temperature 0 --seed "$seed" \
      --percentile-metrics ttft,tpot --metric-percentiles 50 --save-result --result-dir "$out" \
      --result-filename "${name}_vllm_$r.json" >/dev/null 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:14s} vllm    round $r: {d['output_throughput']:7.1f} tok/s  TTFT {d['median_ttft_ms']:7.1f}  TPOT {d['median_tpot_ms']:6.2f} ms  client CPU {sys.argv[3]} s\")" \
      "$out/${name}_vllm_$r.json" "$name" "$(cpu_of "$out/${name}_vllm_$r.cpu")"
    /usr/bin/time -f '%U %S' -o "$out/${name}_sagellm_$r.cpu" "$SAGELLM" bench serve --target "$name=$url" \
      --model "$model" --tokenizer "$PEERS/smollm2-hf" --random-input-len 256 --random-output-len 128 \
      --num-prompts 64 --max-concurrency 16 --ignore-eos --seed $((seed + 1000)) --repeats 1 --no-progress \
      --save-result --result-filename "$out/${name}_sagellm_$r.json" >/dev/null 2>&1
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); s=d['summary'][sys.argv[2]]; print(f\"{sys.argv[2]:14s} sagellm round $r: {s['out_tok_s']:7.1f} tok/s  TTFT {s['ttft_p50_ms']:7.1f}  TPOT {s['tpot_p50_ms']:6.2f} ms  client CPU {sys.argv[3]} s\")" \
      "$out/${name}_sagellm_$r.json" "$name" "$(cpu_of "$out/${name}_sagellm_$r.cpu")"
  done
done
