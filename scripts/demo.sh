#!/usr/bin/env bash
# The main job on the embedded default: build the toy world, run DPA and Vanilla end to end
# with DVC, and print the comparison. Results: outputs/compare/, MLflow: `mlflow ui` (README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
dvc repro "$@"
echo
dpa show
