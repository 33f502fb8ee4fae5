# Sourced by the benchmark scripts that drive servers with `vllm bench serve` on random prompts (peer_table.sh,
# w1_ab.sh, busy_machine.sh, tracing_cost.sh): the CPU line printed beside every table, and one run of the client.
# Needs $out (where results go) and vLLM's client under $PEERS (../shared/peers/setup.sh vllm; default /tmp/peers).
PEERS=${PEERS:-/tmp/peers}

print_cpu() {  # the model, cores and vector flags: only ratios measured on one CPU compare
  echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); $(nproc) cores; $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' \
    | grep -E '^(avx|fma|f16c|amx)' | tr '\n' ' ')"
}

vllm_bench() {  # NAME URL MODEL SEED CONCURRENCY PROMPTS INPUT OUTPUT [more flags]: $out/NAME_cCONCURRENCY_sSEED.json
  local name=$1 url=$2 model=$3 seed=$4 concurrency=$5 prompts=$6 input=$7 output=$8; shift 8
  local run="${name}_c${concurrency}_s${seed}"
  echo "$(date +%T) $name c$concurrency seed $seed" >&2
  VLLM_TARGET_DEVICE=cpu "$PEERS/venv-vllm/bin/vllm" bench serve --backend openai --base-url "$url" \
    --endpoint /v1/completions --model "$model" --tokenizer "$PEERS/smollm2-hf" --dataset-name random \
    --random-input-len "$input" --random-output-len "$output" --num-prompts "$prompts" \
    --max-concurrency "$concurrency" --ignore-eos --temperature 0 --seed "$seed" \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 "$@" \
    --save-result --result-dir "$out" --result-filename "$run.json" >"$out/$run.log" 2>&1 \
    || echo "$name failed (seed $seed): $out/$run.log" >&2
}
