#!/usr/bin/env bash
# Structured output's cost: W1-c16 (64 prompts, 256 tokens in, 128 out, 16 at a time) through every server
# running on this machine, unconstrained and with every request constrained to one JSON schema, `vllm bench serve`
# as the client for all of them (`--extra-body` carries OpenAI's `response_format`, which vLLM and sageLLM both
# take), REPEATS rounds with the servers in a rotating order and fresh prompts for every run; then the medians (`sagellm
# bench vllm-results`, rows NAME and NAME-json), the CPU, and each schema's compile time in sageLLM's compiler.
#
#   benchmarks/structured_output.sh OUT_DIR NAME=URL=MODEL...   (e.g. sagellm=http://127.0.0.1:8000=smollm2-135m-instruct)
#
# The schema is an array of at least 100 small integers: no reply can finish it within 128 tokens, so every request
# of both servers is constrained for all its tokens and the rows compare the same work. Needs vLLM's client
# (../shared/peers/setup.sh vllm) and the servers already started (`sagellm serve --no-embedding`,
# ../shared/peers/serve.sh vllm).
set -euo pipefail
out=$1; shift
SCHEMA='{"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 100}'
BODY="{\"response_format\": {\"type\": \"json_schema\", \"json_schema\": {\"name\": \"numbers\", \"schema\": $SCHEMA}}}"
bash "$(dirname "$0")/w1_ab.sh" "$out" json "$BODY" \
  "W1-c16, unconstrained and every request constrained to a JSON schema, \`vllm bench serve\` as the client" "$@"
"${PYTHON:-python}" - "$SCHEMA" <<'PY'
import json, sys, time
from sagellm.runtime.engine.grammar import grammar_compiler
from sagellm.runtime.engine.guided_params import GuidedDecoding
from sagellm.runtime.models.loader import load_model
from sagellm.runtime.models.model_cache import DEFAULT_MODEL, resolve_model

model = load_model(resolve_model(DEFAULT_MODEL), load_weights=False)
started = time.perf_counter()
compiler = grammar_compiler(model.tokenizer, model.config.vocab_size, model.config.eos_token_ids)
print(f"\nsageLLM's grammar compiler (llguidance) on {model.name}: the tokenizer's tables {1e3 * (time.perf_counter() - started):.0f} ms once")
person = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
          "email": {"type": "string", "format": "email"}, "age": {"type": "integer", "minimum": 0},
          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}, "required": ["name", "age"]}
for label, guided in [("the benchmark's array of 100+ integers", GuidedDecoding(json=sys.argv[1])),
                      ("an object with a string, an email, an integer, an enum array", GuidedDecoding(json=person)),
                      ("a regex \\d{3}-\\d{4}", GuidedDecoding(regex=r"\d{3}-\d{4}")),
                      ("a choice of 3", GuidedDecoding(choice=["yes", "no", "maybe"]))]:
    started = time.perf_counter(); compiler.compile(guided); cold = time.perf_counter() - started
    started = time.perf_counter(); compiler.matcher(guided); warm = time.perf_counter() - started
    print(f"  {label}: compile {1e3 * cold:.1f} ms, then a request's matcher {1e3 * warm:.2f} ms")
PY
