#!/usr/bin/env bash
# The README's test command: installs if needed, then runs the whole suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/sagellm ]] || bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
