#!/usr/bin/env bash
# Creates .venv (if missing) and installs sageLLM with its test tools into it, on the CPU build of torch.
# Idempotent: a second run only refreshes the editable install.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e '.[test]'
