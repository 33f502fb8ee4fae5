#!/usr/bin/env bash
# The CUDA backend on a real GPU, in one run on a machine with an NVIDIA GPU, CUDA, torch, triton and transformers but
# no network (issue 67): installs our wheel and the dependencies the machine lacks from .whl/ (scripts/gpu_bundle.sh
# fills it), then runs, each stage under its own time limit and logged whatever the others did:
#   env      the GPU, the Python stack, and `sagellm backends` showing cuda available
#   install  the wheels into a folder of their own; every requirement present; the modules import; the wheel is the
#            working tree's code (a stale wheel is named)
#   kernels  the triton kernels compiled for the GPU (not interpreted) against the torch ops
#   oracle   our engine on cuda against transformers on the same GPU (tests/backends/gpu_oracle_checks.py)
#   suite    the test suite's oracle files (every architecture, MoE, hybrid caches, speculation, LoRA, penalties,
#            prompt logprobs, GGUF and K-quants, images and audio) with their engines on cuda
#            (SAGELLM_TEST_BACKEND=cuda, or the auto backend), transformers and PEFT on the CPU as in CI
#   w1       W1 against transformers' generate and the GPU's memory-bandwidth roofline (benchmarks/gpu_w1.py)
#   profile  a decode step's wall time against its kernels' device time, at 1 and 16 sequences
#            (benchmarks/step_profile.py: is the step bound by the host or by the GPU?)
# and ends with a table of the stages. Run from anywhere: `bash scripts/gpu_check.sh` (logs and w1.json in $OUT, a
# temporary folder when OUT is unset). `--dry-run` (or SAGELLM_GPU_CHECK_DRY=1) runs the same stages on a machine
# without a GPU, small: the kernels and the oracle under triton's CPU interpreter, W1 on the cpu backend, and only the
# wheels this Python can install (the rest are checked by name), with PY (default .venv/bin/python).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DRY=${SAGELLM_GPU_CHECK_DRY:-0}
[[ "${1:-}" == "--dry-run" ]] && DRY=1
if [[ $DRY == 1 ]]; then PY=${PY:-$ROOT/.venv/bin/python}; else PY=${PY:-python3}; fi
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXXXX)}
SITE=${SITE:-$(mktemp -d /tmp/sagellm-site.XXXXXX)}
TOTAL_S=${SAGELLM_GPU_CHECK_SECONDS:-540}  # the whole run, inside the device's 600 s a command
mkdir -p "$OUT"
# Our wheel first, the repository after it (for tests/), never the current directory (-P): `sagellm` is the wheel's.
export ROOT DRY PY OUT SITE PYTHONPATH="$SITE:$ROOT" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false TRITON_CACHE_DIR=/tmp/sagellm-triton-cache
# A dry run keeps this machine's home, where the suite built the native kernels already (30 s to build again)
[[ $DRY == 1 ]] || export SAGELLM_HOME=/tmp/sagellm-home
unset TRITON_INTERPRET
# pytest on the wheel: no rootdir or current directory put before it on sys.path; no trio plugin (the checks are
# plain functions, and pyproject's trio_mode is then only an unknown option)
run_pytest() { "$PY" -P -m pytest -o pythonpath= -p no:cacheprovider -p no:trio -v "$@"; }

stage_env() {
  timeout 20 nvidia-smi || echo "nvidia-smi: not here or failed"
  echo "uname: $(uname -srm); cores: $(nproc); $(grep MemTotal /proc/meminfo)"
  "$PY" - <<'EOF'
import sys, torch
print(f"python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__}, CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("GPU: none visible to torch")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as error:
    print(f"triton: {error}")
import transformers
print(f"transformers {transformers.__version__}")
EOF
}

stage_install() {
  shopt -s nullglob
  local wheels=("$ROOT"/.whl/*.whl)
  [[ ${#wheels[@]} -gt 0 ]] || { echo "no wheels in $ROOT/.whl: run scripts/gpu_bundle.sh and carry .whl"; return 1; }
  if [[ $DRY == 1 ]]; then  # the cp312 binary wheels do not install on this Python: the pure ones do
    wheels=("$ROOT"/.whl/*-none-any.whl)
    echo "dry run: installing the pure-Python wheels only; binary ones (checked by name in gpu_bundle.sh):"
    ls "$ROOT"/.whl | grep -v -- '-none-any.whl$' | sed 's/^/  /'
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}" \
    || return 1
  "$PY" -P - <<'EOF'
"""Every requirement of the installed sagellm present at a version it admits; the modules that need them import;
the wheel holds the working tree's code."""
import importlib, importlib.metadata as md, os, sys
from pathlib import Path
from packaging.requirements import Requirement

import sagellm
site, root = Path(os.environ["SITE"]), Path(os.environ["ROOT"])
assert Path(sagellm.__file__).is_relative_to(site), f"sagellm imported from {sagellm.__file__}, not the wheel"
print(f"sagellm {sagellm.__version__} from {Path(sagellm.__file__).parent}")
problems = []
for line in md.requires("sagellm") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        problems.append(f"{req.name}: missing (needed: {req})")
        continue
    ok = req.specifier.contains(have, prereleases=True)
    print(f"  {'ok ' if ok else 'BAD'} {req.name} {have} ({req.specifier or 'any'})")
    if not ok:
        problems.append(f"{req.name} {have} is outside {req.specifier}")
for module in ("sagellm.cli.main", "sagellm.llm", "sagellm.runtime.engine.llm_engine", "sagellm.backends.cuda",
               "sagellm.backends.triton_kernels", "sagellm.gateway.server", "sagellm.benchmarks.gpu_w1",
               "trio", "msgspec", "zmq", "structlog", "gguf", "llguidance"):
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 -- each failure is named, then the stage fails
        problems.append(f"import {module}: {type(error).__name__}: {error}")
stale = []  # the wheel maps sagellm/ to sagellm/, and common/, backends/, ... to sagellm/common/, ...
for top in ("sagellm", "common", "backends", "runtime", "operators", "benchmarks", "graphs"):
    for path in (root / top).rglob("*.py"):
        rel = path.relative_to(root / top)
        installed = site / "sagellm" / (rel if top == "sagellm" else Path(top) / rel)
        if not installed.exists() or installed.read_bytes() != path.read_bytes():
            stale.append(str(path.relative_to(root)))
if stale:
    problems.append(f"the wheel is not the working tree's code (rebuild with scripts/gpu_bundle.sh): {stale[:10]}")
for problem in problems:
    print(f"PROBLEM: {problem}")
sys.exit(1 if problems else 0)
EOF
  local status=$?
  "$PY" -P -m sagellm.cli.main backends || status=1
  if [[ $DRY != 1 ]] && ! "$PY" -P -c 'from sagellm.backends.cuda import CudaBackend as C; a = C.availability()
print(a.reason); raise SystemExit(0 if a.available else 1)'; then
    echo "the cuda backend is not available here"; status=1
  fi
  return $status
}

stage_kernels() {
  local subset=() status=0
  if [[ $DRY == 1 ]]; then export TRITON_INTERPRET=1; subset=(-k "rmsnorm or silu_mul or paged_decode"); fi
  run_pytest tests/backends/triton_kernel_checks.py "${subset[@]}" || status=1
  run_pytest tests/backends/test_lora_kernels.py -k "triton and not interpreter" || status=1
  local cubins
  cubins=$(find "$TRITON_CACHE_DIR" -name '*.cubin' 2>/dev/null | wc -l)
  echo "triton cache: $cubins compiled GPU kernels (.cubin) in $TRITON_CACHE_DIR"
  [[ $DRY == 1 || $cubins -gt 0 ]] || { echo "no compiled kernel: were they interpreted?"; status=1; }
  return $status
}

stage_oracle() {
  if [[ $DRY == 1 ]]; then
    # The llama checks' kernels, not their engine paths: preemption, the prefix hit and whole prompts schedule as on
    # the CPU (the suite checks them there), and interpreted they took 44 of the stage's 79 s in CI.
    export SAGELLM_CHECK_BACKEND=cuda-interpreted TRITON_INTERPRET=1 SAGELLM_CHECK_SIZE=small
    run_pytest -s tests/backends/gpu_oracle_checks.py -k "llama and not preempted and not prefix_cache and not whole"
  else
    run_pytest -s tests/backends/gpu_oracle_checks.py
  fi
}

# The suite's files whose engines the GPU can take; not the checks of CPU-only machinery (the native kernels'
# packing and fused layers) or of several ranks (one GPU here).
SUITE_FILES=(tests/engine/test_engine_vs_transformers.py tests/engine/test_architectures_vs_transformers.py
  tests/engine/test_moe_vs_transformers.py tests/engine/test_hybrid_cache.py tests/engine/test_speculative.py
  tests/engine/test_penalties.py tests/engine/test_prompt_logprobs.py tests/engine/test_rope_scaling.py
  tests/engine/test_gguf_logits.py tests/engine/test_kquant_model.py tests/engine/test_lora.py
  tests/multimodal/test_llava_generate.py tests/multimodal/test_idefics3.py tests/multimodal/test_gemma3_vision.py
  tests/multimodal/test_gemma3_gguf.py tests/multimodal/test_qwen2_audio.py tests/multimodal/test_gemma4_vision.py
  tests/multimodal/test_qwen3_5_generate.py tests/multimodal/test_qwen2_5_vl.py tests/multimodal/test_qwen3_vl.py
  tests/multimodal/test_qwen3_5_gguf.py)
SUITE_SKIP="not fused_decoder and not parallel and not holds_only_its_blocks"
stage_suite() {
  local files
  read -ra files <<< "$SUITE_FILES_LIST"
  if [[ $DRY == 1 ]]; then  # CI runs them on the cpu backend: here, only that the selection still names tests
    run_pytest --collect-only -q "${files[@]}" -k "$SUITE_SKIP" | tail -3
    return "${PIPESTATUS[0]}"
  fi
  SAGELLM_TEST_BACKEND=cuda run_pytest -rfE --tb=short -n "${SUITE_WORKERS:-12}" --timeout 150 "${files[@]}" -k "$SUITE_SKIP"
}

stage_w1() {
  if [[ $DRY == 1 ]]; then
    "$PY" -P -m sagellm.benchmarks.gpu_w1 --backend cpu --layers 2 --prompts 4 --c1-prompts 1 --input-len 32 \
      --output-len 8 --copy-mb 64 --out "$OUT/w1.json"
  else
    "$PY" -P -m sagellm.benchmarks.gpu_w1 --out "$OUT/w1.json"
  fi
}

stage_profile() {
  if [[ $DRY == 1 ]]; then
    "$PY" -P -m sagellm.benchmarks.step_profile --backend cpu --layers 2 --steps 4 --batches 1 --prompt-len 16 \
      --rows 5 --out "$OUT/profile.txt"
  else
    "$PY" -P -m sagellm.benchmarks.step_profile --out "$OUT/profile.txt"
  fi
}

export SUITE_FILES_LIST="${SUITE_FILES[*]}" SUITE_SKIP
export -f run_pytest stage_env stage_install stage_kernels stage_oracle stage_suite stage_w1 stage_profile
SUMMARY=()
FAILED=0
run_stage() {  # NAME LIMIT_S: runs stage_NAME under its limit (or what is left of TOTAL_S), logged to $OUT/NAME.log
  local name=$1 limit=$2 left=$((TOTAL_S - SECONDS - 10)) start=$SECONDS rc
  ((limit > left)) && limit=$left
  echo
  echo "=== $name: up to ${limit} s ($(date -u +%H:%M:%S)) ==="
  if ((limit < 15)); then
    SUMMARY+=("| $name | SKIPPED (no time left) | 0 |")
    FAILED=1
    return
  fi
  timeout -k 10 "$limit" bash -c "stage_$name" 2>&1 | tee "$OUT/$name.log"  # a stage is an exported function
  rc=${PIPESTATUS[0]}
  local result=pass
  if ((rc == 124 || rc == 137)); then result="FAIL (timed out at ${limit} s)"; elif ((rc != 0)); then result="FAIL (exit $rc)"; fi
  [[ $result == pass ]] || FAILED=1
  SUMMARY+=("| $name | $result | $((SECONDS - start)) |")
}

echo "gpu_check: $([[ $DRY == 1 ]] && echo "DRY RUN (no GPU: interpreted kernels, cpu W1), ")python $PY, logs in $OUT"
run_stage env 60
run_stage install 90
run_stage kernels 180
run_stage oracle 180
run_stage suite 270
run_stage w1 240
run_stage profile 60
{
  echo "gpu_check $([[ $DRY == 1 ]] && echo "(dry run) ")on $(hostname), $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s in all"
  echo "| stage | result | seconds |"
  echo "|---|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
} | tee "$OUT/summary.md"
exit $FAILED
