#!/usr/bin/env bash
# Creates .venv (if missing) and installs sageLLM into it, editable, on the CPU build of torch: its runtime
# dependencies and the openai and anthropic SDKs the docs' examples use (the `client` extra), or with `--test` also the
# test and benchmark tools (what scripts/test.sh and CI need).
# Idempotent: a second run only refreshes the editable install. Says what it is doing: the first run downloads
# torch and transformers (a few hundred MB), which takes minutes; pip's whole output is kept in .venv/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
target='.[client]'
[[ "${1:-}" == "--test" ]] && target='.[test]'  # the test extra holds the client one
say() { echo "sagellm install: $*" >&2; }
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
say "installing sageLLM ($target) and its dependencies (torch: the CPU build, constraints-cpu.txt)"
log=.venv/install.log
set +e +o pipefail  # pip's own status decides, not grep's (which finds nothing when all is installed)
{ .venv/bin/python -m pip install -q --upgrade pip &&
  .venv/bin/python -m pip install --progress-bar off -c constraints-cpu.txt -e "$target"; } < /dev/null 2>&1 \
  | tee "$log" | grep --line-buffered -E '^(Collecting|Downloading|Successfully installed)' | cut -c1-150 >&2
status=${PIPESTATUS[0]}
set -e -o pipefail
if [[ $status -ne 0 ]]; then
  tail -n 30 "$log" >&2
  say "failed: pip's last messages are above (all of them in $log)"
  exit 1
fi
say "done: $(.venv/bin/sagellm --version)"
