#!/usr/bin/env bash
# Set up, then run the whole test suite (fast tests and the slow end-to-end ones).
# Fast suite only: bash scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_browser.sh || echo "[test] no Chromium: the browser test will be skipped"
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p test-artifacts
python -m pytest -q "$@"
