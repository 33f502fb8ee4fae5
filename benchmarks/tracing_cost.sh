#!/usr/bin/env bash
# What request tracing costs (issue 69): W1-c16 (64 prompts, 256 tokens in, 128 out, 16 at a time; `vllm bench
# serve` as the client) through three `sagellm serve` on the default model, one after another in a rotating order,
# REPEATS rounds with fresh prompts each run: BASE_TREE's code (the commit before tracing, a checkout with its own
# .venv whose editable install points at it), this checkout with tracing off, and this checkout exporting every
# request's trace to an OTLP/HTTP sink on this machine (`benchmarks/otlp_sink.py`). Then the medians (`sagellm bench
# vllm-results`) and the CPU.
#
#   benchmarks/tracing_cost.sh OUT_DIR BASE_TREE
#
# Needs vLLM's client (../shared/peers/setup.sh vllm) and a quiet machine.
set -euo pipefail
out=$1 base=$2
REPEATS=${REPEATS:-2}
SEED=${SEED:-$((RANDOM * 10))}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
source "$here/benchmarks/vllm_client.sh"  # print_cpu, vllm_bench
print_cpu
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null' EXIT

"$here/.venv/bin/python" -m sagellm.benchmarks.otlp_sink 4318 >"$out/sink.log" 2>&1 & pids+=($!)
serve() {  # NAME TREE PORT [flags]
  local name=$1 tree=$2 port=$3; shift 3
  (cd "$tree" && exec .venv/bin/python -m sagellm.cli.main serve --port "$port" --no-embedding "$@") >"$out/$name.server.log" 2>&1 &
  pids+=($!)
  until curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null; do sleep 2; done
  echo "$(date +%T) $name ready on $port" >&2
}
serve before "$base" 8101
serve off "$here" 8102
serve on "$here" 8103 --otlp-traces-endpoint http://127.0.0.1:4318/v1/traces
model=$(curl -s http://127.0.0.1:8101/v1/models | "$here/.venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')

bench() {  # NAME PORT SEED: one W1-c16 run
  vllm_bench "$1" "http://127.0.0.1:$2" "$model" "$3" 16 64 256 128
}
names=(before off on) ports=(8101 8102 8103)
for ((r = 0; r < REPEATS; r++)); do
  for ((i = 0; i < 3; i++)); do
    k=$(((i + r) % 3))
    bench "${names[k]}" "${ports[k]}" $((SEED + 3 * r + i))
  done
done
"$here/.venv/bin/sagellm" bench vllm-results "$out" --out "$out/summary" --title "W1-c16: tracing off, on, and before it"
