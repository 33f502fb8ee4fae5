#!/usr/bin/env bash
# What penalties cost: W1-c16 through every server running on this machine, as it is and with
# presence, frequency and repetition penalties on every request (`w1_ab.sh`, `vllm bench serve` as the client).
#
#   benchmarks/penalties.sh OUT_DIR NAME=URL=MODEL...   (e.g. sagellm=http://127.0.0.1:8000=smollm2-135m-instruct)
#
# `ignore_eos` and greedy sampling keep every reply 128 tokens long, so both rows compare the same work; the
# penalties change which tokens are chosen, not how many.
set -euo pipefail
out=$1; shift
BODY='{"presence_penalty": 0.5, "frequency_penalty": 0.5, "repetition_penalty": 1.1}'
bash "$(dirname "$0")/w1_ab.sh" "$out" penalties "$BODY" \
  "W1-c16 without and with penalties on every request (vllm bench serve)" "$@"
