#!/usr/bin/env bash
# Fills .whl/ with what scripts/gpu_check.sh installs on a GPU machine that has no network: our wheel, and wheels
# (CPython 3.12, manylinux x86-64) of the dependencies its image lacks. Run here, where pip reaches PyPI; then carry
# `.whl` with the working tree (it is ignored through .git/info/exclude, so it travels only when carried).
#
# The image's Python packages (torch, triton, transformers, numpy, ...) are not carried: DEVICE_HAS lists the ones
# our requirements name, as the device's notes list them, and the closure check below fails when a requirement of
# ours or of a carried wheel is in neither. Versions: the ones the local .venv runs the test suite with.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=.whl
# name==version of each carried dependency
# transformers and its hub client too: the oracle is the transformers CI runs (the image's 5.17 builds no tokenizer from
# several families' GGUF metadata, saves a tiny Qwen2-Audio under names no checkpoint has, and fails on Gemma 3n's).
CARRIED=(trio==0.35.0 outcome==1.3.0.post0 sniffio==1.3.1 msgspec==0.22.0 pyzmq==27.3.0 structlog==26.1.0
  gguf==0.19.0 llguidance==1.9.1 transformers==5.24.0 huggingface-hub==2.4.0
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 click==8.5.1 hf-xet==1.8.0
  openai==3.57.0 jiter==0.19.0 distro==1.9.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5)  # the openai SDK: the suite's image tests send it
# On the GPU image already (the device notes' package list), among the names our requirements reach.
DEVICE_HAS=(torch tokenizers safetensors jinja2 numpy anyio prometheus-client nvidia-ml-py rich tqdm pyyaml httpx
  attrs idna sortedcontainers requests pillow packaging regex typer filelock fsspec typing-extensions h11)

say() { echo "gpu_bundle: $*" >&2; }
EXCLUDE=$(git rev-parse --git-path info/exclude)  # .git/info/exclude; in a worktree, its own
grep -qx '/.whl/' "$EXCLUDE" 2>/dev/null || { mkdir -p "$(dirname "$EXCLUDE")" && echo '/.whl/' >> "$EXCLUDE"; }
rm -rf "$OUT_DIR" && mkdir -p "$OUT_DIR"

say "building the sagellm wheel"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT_DIR" . > /dev/null

platforms=()
for n in 17 24 26 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
say "downloading ${#CARRIED[@]} dependency wheels for CPython 3.12 x86-64"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$OUT_DIR" "${CARRIED[@]}"

say "checking that every requirement is carried or on the GPU image"
"$PY" - "$OUT_DIR" "${DEVICE_HAS[@]}" <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

folder, device_has = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2:]}
carried, needs = {}, {}
for wheel in sorted(folder.glob("*.whl")):
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    metadata = metadata.replace("\r\n", "\n")
    name = canonicalize_name(re.search(r"^Name: (.+)$", metadata, re.M).group(1))
    carried[name] = wheel.name
    for line in re.findall(r"^Requires-Dist: (.+)$", metadata, re.M):
        req = Requirement(line)
        # the markers as the device evaluates them: Linux x86-64, CPython 3.12, no extras
        if req.marker is None or req.marker.evaluate({"python_version": "3.12", "extra": "", "sys_platform": "linux",
                                                      "platform_system": "Linux", "platform_machine": "x86_64"}):
            needs.setdefault(canonicalize_name(req.name), set()).add(name)
missing = {n: sorted(by) for n, by in needs.items() if n not in carried and n not in device_has}
for n, wheel in sorted(carried.items()):
    print(f"  carried  {wheel}")
if missing:
    sys.exit(f"gpu_bundle: required but neither carried nor on the GPU image: {missing}")
print(f"  {len(needs)} requirements covered: {len(set(needs) & set(carried))} carried, the rest on the image")
EOF
say "$(du -sh "$OUT_DIR" | cut -f1) in $OUT_DIR; the working tree that travels with it:"
{ git ls-files; git ls-files --others --exclude-standard; } | sort -u | while IFS= read -r f; do
  [[ -f "$f" ]] && printf '%s\0' "$f"
done | du -ch --files0-from=- | tail -1 >&2
