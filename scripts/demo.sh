#!/usr/bin/env bash
# The main job on the embedded default: build the toy world, run DPA and Vanilla end to end
# with DVC, and print the comparison, the MLflow link and where the loss curves are (README).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SECONDS=0
dvc repro "$@"
echo
dpa show
echo "Loss curves (every arm per training stage): .venv/bin/dvc plots show   -> dvc_plots/index.html"
echo "Talk to a model:  .venv/bin/dpa chat outputs/merged/dpa-seed0 --image data/toyworld/images/bench/000000.png"
echo "[demo] pipeline finished in $((SECONDS / 60)) min $((SECONDS % 60)) s"
