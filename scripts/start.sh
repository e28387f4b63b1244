#!/usr/bin/env bash
# Set up .venv if needed, write the bundled biased-digits sample dataset and run
# MaskTune on it with the local CLI (the web service will start here once it lands).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
data=runs/sample-data
[ -f "$data/metadata.csv" ] || .venv/bin/python -m masktune_core.sample_data "$data"
exec .venv/bin/python -m masktune_core run --data "$data" --arch small_cnn --out runs/demo --epochs "${EPOCHS:-30}" --config scripts/demo-config.json "$@"
