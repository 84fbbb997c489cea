#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, the end-to-end SmolLM2 export included.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -ra "$@"
