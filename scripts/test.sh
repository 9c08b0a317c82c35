#!/usr/bin/env bash
# Set up a venv with the test references (diffusers, transformers) and run the whole suite,
# Ray for the batch backend's test, full-size SD1.5/SD2.1 parity included (about 10 GB of RAM at peak).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/system-deps.sh
EXTRAS=test,server,data,ray bash scripts/setup.sh
.venv/bin/python -m ruff check src tests bench
.venv/bin/python -m pytest -q "$@"
