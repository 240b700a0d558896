#!/usr/bin/env bash
# Create .venv (if missing) and install xright_pl with its test and plotting extras.
# torch is pinned here (not in the library's requirements) so that a CPU build is taken where one is available.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev,plot,lora]"
echo "xright_pl installed in $(pwd)/.venv"
