#!/usr/bin/env bash
# Create .venv and install ldmkit into it. EXTRAS=test,server adds the test references.
# PyTorch is installed first at a pinned CPU-capable release so that the `torch>=2.1` range in
# pyproject.toml is already satisfied and pip never pulls a multi-GB CUDA build on its own.
# Elsewhere, TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu gets the small CPU wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
.venv/bin/python -m pip install -q -e ".[${EXTRAS:-server}]"
.venv/bin/python -c "import torch, ldmkit; print('ldmkit', ldmkit.__version__, 'torch', torch.__version__)"
