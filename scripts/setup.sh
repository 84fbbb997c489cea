#!/usr/bin/env bash
# Create ./.venv and install srcr with everything it needs. Safe to re-run: finished steps are skipped,
# and pip's wheel cache keeps the llama-cpp-python build (minutes on 2 cores) from repeating.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
"${pip[@]}" install -q --upgrade pip

# An unpinned torch pulls a multi-GB CUDA build. CPU machines get the pinned CPU wheel; a machine that
# already has a torch in the venv (a GPU user's CUDA build) keeps it. TORCH_SPEC overrides.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${pip[@]}" install -q "${TORCH_SPEC:-torch==2.13.0}"
fi

# llama-cpp-python compiles llama.cpp; the multimodal part is not needed.
export CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF}"
# setuptools warns on every editable install that a folder named like the package may shadow it;
# here that folder (srcr/) *is* the package, so the notice is noise. The extras: the tests, lm-eval on the
# artifact, and Ray for `srcr sweep --executor ray` (its tests start a local cluster of their own).
PYTHONWARNINGS="ignore::UserWarning" "${pip[@]}" install -q -e ".[dev,lm-eval,ray]"

# llama.cpp's own HF->GGUF converter, from the installed llama-cpp-python's source distribution (same
# llama.cpp version): the GGUF target converts every family but llama, mistral and qwen2 with it.
if ! .venv/bin/python -c "from srcr.targets.gguf.upstream import locate_converter; locate_converter()" 2>/dev/null; then
    .venv/bin/python -m srcr.targets.gguf.upstream
fi

# onnxruntime and onnxruntime-gpu install into the same import folder; if something pulled in the
# CPU-only package, remove it and restore the GPU build (which falls back to the CPU provider).
if "${pip[@]}" show onnxruntime >/dev/null 2>&1; then
    "${pip[@]}" uninstall -q -y onnxruntime
    "${pip[@]}" install -q --force-reinstall --no-deps onnxruntime-gpu
fi
echo "srcr is installed in .venv: run .venv/bin/srcr --help"
