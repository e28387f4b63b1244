#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): one table, about 5 minutes on one H200.
#
#   bash bench/gpu_check.sh                 # CUDA; with OUT set, the table also goes to $OUT/gpu_check.md
#   bash bench/gpu_check.sh --smoke         # the same code on the CPU at toy sizes, in well under a minute (CI)
#   bash bench/gpu_check.sh --fetch-wheels  # here, where PyPI answers: put into .whl/ (git-ignored, about 3 MB)
#                                           # the wheels a GPU image's python3 lacks (pydantic, grad-cam, ...)
#
# The GPU machine reaches no network: the script runs with .venv/bin/python when that works, else with
# python3 or python; a python that lacks some of the project's modules gets them from .whl/ (installed
# into a temporary folder, nothing else touched). GPU_CHECK_PYTHON=/path/to/python is tried first.
# This checkout's code comes first on PYTHONPATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

MODULES="torch torchvision timm pytorch_grad_cam ttach cv2 pydantic numpy PIL sklearn safetensors huggingface_hub tqdm"
# Wheels for what a plain GPU image lacks (its python3 has torch, torchvision, timm, opencv, sklearn, ...):
# the versions this checkout's .venv holds, for CPython ${GPU_PYTHON_VERSION:-3.12} on x86-64 Linux.
WHEELS="pydantic pydantic_core annotated-types typing-inspection typing_extensions ttach"

missing() {  # the modules of $MODULES that the python $1 cannot find (without importing them)
  "$1" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' \
    $MODULES 2>/dev/null || echo "(not a working python)"
}

if [ "${1:-}" = "--fetch-wheels" ]; then
  PY="${GPU_CHECK_PYTHON:-$ROOT/.venv/bin/python}"  # the environment whose versions the wheels repeat
  pins=$("$PY" -c 'import sys; from importlib.metadata import version; print(" ".join(f"{n}=={version(n)}" for n in sys.argv[1:]))' $WHEELS)
  mkdir -p .whl
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
  # grad-cam is pure Python: its wheel fits every interpreter
  "$PY" -m pip wheel --no-deps --no-build-isolation -w .whl "grad-cam==$("$PY" -c 'from importlib.metadata import version; print(version("grad-cam"))')"
  ls -l .whl
  exit 0
fi

PY=""
for candidate in ${GPU_CHECK_PYTHON:+"$GPU_CHECK_PYTHON"} "$ROOT/.venv/bin/python" python3 python; do
  command -v "$candidate" >/dev/null 2>&1 || continue
  lacking="$(missing "$candidate")"
  if [ -n "$lacking" ] && [ -d "$ROOT/.whl" ] && [[ " $lacking " != *" torch "* && "$lacking" != "(not"* ]]; then
    site="$(mktemp -d /tmp/gpu-check-site.XXXXXX)"
    echo "gpu_check: $candidate lacks $lacking; installing .whl/ into $site" >&2
    "$candidate" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$ROOT"/.whl/*.whl >&2 || true
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    lacking="$(missing "$candidate")"
  fi
  if [ -z "$lacking" ]; then
    PY="$candidate"
    break
  fi
  echo "gpu_check: $candidate lacks $lacking" >&2
done
if [ -z "$PY" ]; then
  echo "gpu_check: no python with $MODULES (tried .venv/bin/python, python3, python; see --fetch-wheels)" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

echo "## machine"
echo "python: $(command -v "$PY")"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.max.sm,mig.mode.current \
    --format=csv || nvidia-smi || true
else
  echo "nvidia-smi: not found on this machine"
fi
echo

exec "$PY" bench/gpu_check.py "$@"
