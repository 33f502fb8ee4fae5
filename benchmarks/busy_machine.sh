#!/usr/bin/env bash
# W1 single stream (8 prompts, 256 tokens in, 128 out, one at a time) through each server on a quiet machine and with
# one busy program beside it (`yes > /dev/null`, a core's worth), `vllm bench serve` as the client for all of them:
# what a laptop with a browser open, or a host whose other programs share the cores, does to each one's TPOT.
# Each server is started alone (an idle peer's background threads would be part of the load), measured REPEATS
# rounds (quiet and busy in turns, fresh prompts each run), and stopped; then the medians (`sagellm bench
# vllm-results`: rows NAME and NAME-busy), the CPU and a chart.
#
#   benchmarks/busy_machine.sh OUT_DIR [SERVER...]     SERVER: sagellm sagellm-pd sagellm-fixed vllm llamacpp
#                                                      llamacpp-q4 (default: sagellm sagellm-pd vllm llamacpp-q4)
#   sagellm-fixed: ours with --no-adaptive-threads, its threads kept at the cores' count as the peers keep theirs.
#
# Needs the peers (../shared/peers/setup.sh vllm llamacpp installs them under $PEERS, default /tmp/peers) and a quiet
# machine: stop your own servers and tests first.
set -euo pipefail
out=$1; shift
servers=("${@:-sagellm sagellm-pd vllm llamacpp-q4}")
read -r -a servers <<<"${servers[*]}"
here=$(cd "$(dirname "$0")/.." && pwd)
SERVE=${SERVE:-$here/../shared/peers/serve.sh}
SAGELLM=${SAGELLM:-$here/.venv/bin/sagellm}
REPEATS=${REPEATS:-2}
SEED=${SEED:-$((RANDOM * 10))}
PORT=${PORT:-8190}
mkdir -p "$out"
source "$here/benchmarks/server_lifecycle.sh"  # wait_ready, stop
source "$here/benchmarks/vllm_client.sh"  # print_cpu, vllm_bench
print_cpu

start() {  # NAME -> the server's pid in $server, its model name in $model
  case $1 in
    sagellm) "$SAGELLM" serve --no-embedding --port "$PORT" --log-format json >"$out/$1.log" 2>&1 & model=smollm2-135m-instruct ;;
    sagellm-fixed) "$SAGELLM" serve --no-embedding --no-adaptive-threads --port "$PORT" --log-format json \
      >"$out/$1.log" 2>&1 & model=smollm2-135m-instruct ;;
    sagellm-pd) "$SAGELLM" serve "$here/graphs/pd.yaml" --no-embedding --port "$PORT" --log-format json \
      >"$out/$1.log" 2>&1 & model=smollm2-135m-instruct ;;
    vllm|llamacpp|llamacpp-q4) bash "$SERVE" "$1" "$PORT" >"$out/$1.log" 2>&1 & model=smollm2 ;;
    *) echo "unknown server $1 (sagellm sagellm-pd sagellm-fixed vllm llamacpp llamacpp-q4)" >&2; exit 2 ;;
  esac
  server=$!
  wait_ready "$1"
}

bench() {  # NAME SEED: one W1 single-stream run
  vllm_bench "$1" "http://127.0.0.1:$PORT" "$model" "$2" 1 8 256 128
}

busy() {  # NAME SEED: the run with one busy program beside the server
  yes >/dev/null &
  local hog=$!
  sleep 1  # the server's threads see it before the first request
  bench "$1-busy" "$2"
  kill "$hog"; wait "$hog" 2>/dev/null || true
}

trap 'stop 2>/dev/null; pkill -x yes 2>/dev/null || true' EXIT
for name in "${servers[@]}"; do
  start "$name"
  bench "$name-warmup" "$((SEED + 999))"  # first requests compile and fault pages in: not measured
  rm -f "$out/$name-warmup_c1_s$((SEED + 999)).json"
  for ((r = 0; r < REPEATS; r++)); do  # quiet and busy in turns: neither always runs first
    if ((r % 2 == 0)); then
      bench "$name" "$((SEED + 2 * r))"; busy "$name" "$((SEED + 2 * r + 1))"
    else
      busy "$name" "$((SEED + 2 * r))"; bench "$name" "$((SEED + 2 * r + 1))"
    fi
  done
  stop
done
"$SAGELLM" bench vllm-results "$out" --out "$out/summary" \
  --title "W1 single stream, quiet and beside \`yes > /dev/null\` (NAME-busy), \`vllm bench serve\` as the client"
