#!/usr/bin/env bash
# The README's test command: installs sageLLM with its test tools if needed, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/pytest ]] || bash scripts/install.sh --test
exec .venv/bin/python -m pytest "$@"
