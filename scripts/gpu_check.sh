#!/usr/bin/env bash
# The prepared GPU check, for a machine with CUDA torch (e.g. the `device` tool's H200), run as one call:
#   bash scripts/gpu_check.sh            # writes to $OUT (the device tool's folder) or bench-results/
# 1. the CUDA pruning path against the CPU one (tests/test_pruning.py::test_cuda_device_matches_cpu), when
#    pytest is installed; 2. bench_solver.py at full Llama-3.1-8B shapes (128 x 2048 tokens, bf16
#    activations, with every in-leaf solver variant) against the column-by-column baseline; 3. the streamed
#    calibrate + prune of a 4-layer Llama-3.1-8B-shaped bf16 model read from disk (bench_stream_prune.py):
#    seconds per layer (goal <= 1.3 s), peak GPU memory, peak host RSS.
# Needs torch, transformers, accelerate, safetensors, numpy, psutil and rich: no llama.cpp, gguf or
# onnxruntime (the GGUF conversion and evaluation after pruning run on the CPU machines' test suite).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench-results}"
python="${PYTHON:-python3}"
mkdir -p "$out"
"$python" - <<'PY' | tee "$out/gpu.txt"
import torch
assert torch.cuda.is_available(), "no CUDA device: this check needs a GPU"
print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))
PY
if "$python" -c "import pytest" 2>/dev/null; then
    "$python" -m pytest -q -p no:cacheprovider tests/test_pruning.py -k cuda 2>&1 | tail -3 | tee "$out/pytest_cuda.txt"
fi
"$python" bench/bench_solver.py --device cuda --repeats "${REPEATS:-3}" --json "$out/solver_cuda.json" \
    2> >(tee "$out/solver_cuda.txt" >&2)
if "$python" -c "import accelerate, safetensors, psutil" 2>/dev/null; then
    "$python" bench/bench_stream_prune.py --device cuda --layers "${STREAM_LAYERS:-4}" \
        --json "$out/stream_prune_cuda.json" 2> >(tee "$out/stream_prune_cuda.txt" >&2)
else
    echo "bench_stream_prune.py skipped: accelerate, safetensors or psutil missing (carry them in PYTHONPATH)" \
        | tee "$out/stream_prune_cuda.txt"
fi
