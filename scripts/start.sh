#!/usr/bin/env bash
# Set up .venv if needed, write the sample dataset, then start the service (API + worker)
# with the embedded defaults: SQLite, a local blob folder and a broker that needs no server.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
sample=runs/sample/biased-digits.zip
[ -f "$sample" ] || .venv/bin/python -m masktune_core.sample_data runs/sample/biased-digits --zip >/dev/null
echo "sample dataset: $sample"
exec .venv/bin/python scripts/serve.py
