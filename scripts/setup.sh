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
# VLMEvalKit without its dependency list (see requirements/vlmeval.txt for why): the dependencies
# it needs first, then VLMEvalKit itself with --no-deps, in that order. (The other order makes pip
# check VLMEvalKit's full list while installing the needed ones, and print an "ERROR: pip's
# dependency resolver ..." line for the requirements left out on purpose.)
.venv/bin/python -m pip install -q -c constraints.txt -r requirements/vlmeval.txt
.venv/bin/python -m pip install -q -c constraints.txt --no-deps nvidia-vlmeval
echo "[setup] installed into .venv ($(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
