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
REPEATS=${REPEATS:-2}
SEED=${SEED:-$((RANDOM * 10))}
mkdir -p "$out"
source "$(dirname "$0")/vllm_client.sh"  # print_cpu, vllm_bench
print_cpu

bench() {  # NAME URL MODEL SEED [flags]: one W1-c16 run
  vllm_bench "$1" "$2" "$3" "$4" 16 64 256 128 "${@:5}"
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
