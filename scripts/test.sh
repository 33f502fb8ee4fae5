#!/usr/bin/env bash
# The README's test command: installs sageLLM with its test tools if needed, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/pytest ]] || bash scripts/install.sh --test
# Two workers by default (SAGELLM_TEST_WORKERS; 0: none), each taking whole files, so a module's shared server
# stays in one process: most tests wait on processes starting and servers answering, and the two overlap.
workers="${SAGELLM_TEST_WORKERS:-2}"
if [[ "$workers" == 0 ]]; then
  exec .venv/bin/python -m pytest "$@"
fi
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
