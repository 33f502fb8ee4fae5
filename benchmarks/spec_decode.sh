#!/usr/bin/env bash
# What n-gram (prompt-lookup) speculation buys, ours against vLLM-CPU's, `vllm bench serve` as the client for
# every server. Three workloads, greedy and --ignore-eos (every server writes the same number of tokens):
#   echo    8 prompts asking to copy a ~512-token text with one word changed, 256 tokens out, single stream: most of the
#           answer is already in the prompt, the case speculation is for (benchmarks/spec_decode_dataset.py writes them)
#   W1-c1   8 random 256-token prompts, 128 out, single stream; W1-c16: 64 of them at 16 concurrent (as peer_table.sh).
#           Not a workload where lookup misses: on random tokens SmolLM2 falls into a loop ("sEYESEYESEYES...") within a
#           few tokens, and the loop is in its own output for lookup to find; with --ignore-eos every server writes it.
# REPEATS rounds with the servers in a rotating order and a fresh seed per round and workload (prefix caches remember),
# then the medians (`sagellm bench vllm-results`), and each `NAME-ngram` server's speed-up over `NAME`.
#
#   benchmarks/spec_decode.sh OUT_DIR NAME=URL=MODEL...     (WORKLOADS="echo c1 c16" by default picks the workloads)
#
# The servers, started beforehand as for peer_table.sh; name the speculating one NAME-ngram.
# With SPEC='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}':
#   sagellm        sagellm serve --no-embedding --port 8000                     (serves smollm2-135m-instruct)
#   sagellm-ngram  sagellm serve --no-embedding --port 8001 --speculative-config "$SPEC"
#   vllm           ../shared/peers/serve.sh vllm 8100                                    (serves smollm2)
#   vllm-ngram     what serve.sh vllm runs (vLLM-CPU 0.32 accepts ngram), with SPEC and another port:
#                    VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_OMP_THREADS_BIND=0-1 \
#                    VLLM_HOST_IP=127.0.0.1 LD_PRELOAD=$PEERS/venv-vllm/lib/libiomp5.so \
#                    $PEERS/venv-vllm/bin/vllm serve $PEERS/smollm2-hf --served-model-name smollm2 --dtype float32 \
#                    --max-model-len 2048 --host 127.0.0.1 --port 8101 --speculative-config "$SPEC"
# e.g. benchmarks/spec_decode.sh results/spec sagellm=http://127.0.0.1:8000=smollm2-135m-instruct \
#        sagellm-ngram=http://127.0.0.1:8001=smollm2-135m-instruct vllm=http://127.0.0.1:8100=smollm2 \
#        vllm-ngram=http://127.0.0.1:8101=smollm2
# (the project's venv on PATH: `sagellm`, and `python3` with `tokenizers` for the prompts)
# TPOT, not ITL, is the number to compare: a speculating server streams several tokens per chunk, and vLLM's client
# measures ITL between chunks but TPOT as (latency - TTFT) / (tokens - 1).
set -euo pipefail
out=$1; shift
servers=("$@")
here=$(dirname "$0")
PEERS=${PEERS:-/tmp/peers}
REPEATS=${REPEATS:-3}
WORKLOADS=${WORKLOADS:-echo c1 c16}
SEED=${SEED:-$((RANDOM * 10))}
mkdir -p "$out"
# another job on the 2 cores moves every number: the load before and after says whether there was one
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx|fma|f16c|amx)' | tr '\n' ' ')"

bench() {  # NAME URL MODEL SEED CONCURRENCY PROMPTS dataset flags...
  local name=$1 url=$2 model=$3 seed=$4 concurrency=$5 prompts=$6; shift 6
  echo "$(date +%T) $name c$concurrency seed $seed" >&2
  # timeout: a server that hangs costs its row, not the run
  VLLM_TARGET_DEVICE=cpu timeout "${RUN_TIMEOUT:-900}" "$PEERS/venv-vllm/bin/vllm" bench serve --backend openai \
    --base-url "$url" --endpoint /v1/completions --model "$model" --tokenizer "$PEERS/smollm2-hf" \
    --num-prompts "$prompts" --max-concurrency "$concurrency" --ignore-eos --temperature 0 --seed "$seed" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 "$@" --save-detailed \
    --save-result --result-dir "$out" --result-filename "${name}_c${concurrency}_s${seed}.json" >/dev/null 2>&1 \
    || echo "$name failed (seed $seed)" >&2
}

for ((r = 0; r < REPEATS; r++)); do
  # the round's echo prompts; vllm bench applies the model's chat template to them (its custom dataset does)
  echo_seed=$((SEED + 200 + r))
  if [[ " $WORKLOADS " == *" echo "* ]]; then
    "${PYTHON:-python3}" "$here/spec_decode_dataset.py" "$out/echo_s$echo_seed.jsonl" --seed $echo_seed \
      --tokenizer "$PEERS/smollm2-hf/tokenizer.json"
  fi
  n=${#servers[@]}
  for ((i = 0; i < n; i++)); do  # round r starts with server r: every server goes first once in three rounds
    IFS== read -r name url model <<<"${servers[(i + r) % n]}"
    for w in $WORKLOADS; do
      case $w in
        echo) bench "$name-echo" "$url" "$model" $echo_seed 1 8 --dataset-name custom \
                --dataset-path "$out/echo_s$echo_seed.jsonl" --custom-output-len 256 ;;
        c1) bench "$name" "$url" "$model" $((SEED + 100 + r)) 1 8 --dataset-name random \
              --random-input-len 256 --random-output-len 128 ;;
        c16) bench "$name" "$url" "$model" $((SEED + r)) 16 64 --dataset-name random \
               --random-input-len 256 --random-output-len 128 ;;
      esac
    done
  done
done
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"${SAGELLM:-sagellm}" bench vllm-results "$out" --out "$out/summary" \
  --title "n-gram speculation, vllm bench serve as the client"

# Each NAME-ngram row against NAME's medians, and how many answers it wrote as NAME did (--save-detailed keeps them;
# same seed, same prompts in the same order). Greedy speculation should not change a text, but checking k tokens in
# one step adds the numbers in another order than one token at a time, so a near-tie can flip.
"${PYTHON:-python3}" - "$out" <<'EOF'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = {(r["server"], r["concurrency"]): r for r in json.loads((out / "summary.json").read_text())["rows"]}


def texts(path):
    return json.loads(path.read_text()).get("generated_texts", []) if path.exists() else []


print("\n| workload | server | TPOT p50 ms: plain -> ngram | out tok/s: plain -> ngram | speed-up | texts as plain's |")
print("|---|---|---|---|---|---|")
for (server, c), spec in sorted(rows.items(), key=lambda row: (not row[0][0].endswith("-echo"), row[0][1], row[0][0])):
    plain = rows.get((server.replace("-ngram", "", 1), c))
    if "-ngram" not in server or not plain or not spec.get("output_throughput") or not plain.get("output_throughput"):
        continue
    pairs = [(texts(f), texts(out / f.name.replace("-ngram", "", 1))) for f in out.glob(f"{server}_c{c}_s*.json")]
    compared = sum(min(len(a), len(b)) for a, b in pairs)  # 0: saved without the texts
    same = f"{sum(x == y for a, b in pairs for x, y in zip(a, b))}/{compared}" if compared else "-"
    print(f"| {'echo' if server.endswith('-echo') else f'W1-c{c}'} | {server.removesuffix('-echo')} | "
          f"{plain['p50_tpot_ms']:.1f} -> {spec['p50_tpot_ms']:.1f} | "
          f"{plain['output_throughput']:.1f} -> {spec['output_throughput']:.1f} | "
          f"**{spec['output_throughput'] / plain['output_throughput']:.2f}x** | {same} |")
EOF
