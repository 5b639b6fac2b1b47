#!/usr/bin/env bash
# Create .venv and install the project with the pinned working set (constraints.txt).
# CPU machines get torch's CPU wheel where one is provided locally; GPU machines get CUDA torch
# from PyPI (or use docker/Dockerfile.gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade "pip>=24" >/dev/null
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev${DPA_EXTRAS:+,$DPA_EXTRAS}]"
# VLMEvalKit without its dependency list (see requirements/vlmeval.txt for why).
.venv/bin/python -m pip install -q -c constraints.txt --no-deps nvidia-vlmeval
.venv/bin/python -m pip install -q -c constraints.txt -r requirements/vlmeval.txt
echo "[setup] installed into .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
