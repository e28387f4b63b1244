#!/usr/bin/env bash
# Rewrite constraints.txt from .venv (after changing dependencies in pyproject.toml and installing them):
# every installed package but the project itself and torch's build-specific packages (CUDA or CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
{
  sed -n '1,/^# Regenerate/p' constraints.txt
  .venv/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(masktune-service|torch|torchvision|triton|nvidia-)'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
