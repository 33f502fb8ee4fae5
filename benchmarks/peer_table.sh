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
REPEATS=${REPEATS:-3}
SEED=${SEED:-$((RANDOM * 10))}  # fresh prompts every run: vLLM's prefix cache and llama.cpp's slots remember
mkdir -p "$out"
source "$(dirname "$0")/vllm_client.sh"  # print_cpu, vllm_bench
print_cpu

for ((r = 0; r < REPEATS; r++)); do
  n=${#servers[@]}
  for ((i = 0; i < n; i++)); do  # round r starts with server r: every server goes first once in three rounds
    IFS== read -r name url model <<<"${servers[(i + r) % n]}"
    vllm_bench "$name" "$url" "$model" $((SEED + r)) 16 64 256 128
    vllm_bench "$name" "$url" "$model" $((SEED + 100 + r)) 1 8 256 128
    vllm_bench "$name-w3" "$url" "$model" $((SEED + 200 + r)) 1 16 32 16 --random-prefix-len 512
  done
done
here=$(cd "$(dirname "$0")/.." && pwd)
"${SAGELLM:-$here/.venv/bin/sagellm}" bench vllm-results "$out" --out "$out/summary"  # the checkout's, not PATH's
