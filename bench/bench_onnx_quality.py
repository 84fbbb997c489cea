"""ONNX quality yardstick: srcr's ONNX exports of the dense SmolLM2 at several settings, run by ONNX Runtime.

Each setting is exported through ONNXTarget, opened in srcr's ONNX Runtime runtime and scored on
lee.cor in 512-token windows (no BOS: the tokenizer adds none) against the dense PyTorch model, as
bench_gguf_quality.py does for GGUF: mean KL(dense || artifact) over all positions, same-top-token
rate, perplexity, plus artifact bytes, where they go, bits per weight and greedy decode speed.
Prints JSON.

    .venv/bin/python bench/bench_onnx_quality.py [--settings fp32 MatMulNBits-q4-wls-b32 ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srcr.exporter.calibration import evaluation_text  # noqa: E402
from srcr.exporter.models import ensure_default_checkpoint  # noqa: E402
from srcr.targets.onnx.target import ONNXTarget  # noqa: E402

WINDOW = 512
DECODE_TOKENS = 32
SETTINGS = (
    "fp32",
    "fp16",
    "MatMulNBits-q8-wls-b32",
    "MatMulNBits-q8-rtn-b32",
    "MatMulNBits-q4-wls-b32",
    "MatMulNBits-q4-hqq-b32",
    "MatMulNBits-q4-rtn-b32",
    "MatMulNBits-q4-wls-b16",
    "MatMulNBits-q2-wls-b32",
    "int8-dynamic",
)


def token_windows(tokenizer, text: str, window: int) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[start : start + window] for start in range(0, len(ids) - window + 1, window)]


def torch_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def score(runtime, references: list[np.ndarray], windows: list[list[int]]) -> dict[str, float]:
    kls, tops, nlls = [], [], []
    for reference, window in zip(references, windows, strict=True):
        candidate = runtime.logprobs(window).astype(np.float64)
        kls.append((np.exp(reference) * (reference - candidate)).sum(-1))
        tops.append(reference.argmax(-1) == candidate.argmax(-1))
        nlls.append(-candidate[np.arange(len(window) - 1), window[1:]])
    return {
        "mean_kl": float(np.concatenate(kls).mean()),
        "same_top_token": float(np.concatenate(tops).mean()),
        "ppl": float(np.exp(np.concatenate(nlls).mean())),
    }


def decode_ms_per_token(runtime, prompt: list[int]) -> float:
    started = time.perf_counter()
    generated = runtime.generate(prompt, DECODE_TOKENS)
    return 1000 * (time.perf_counter() - started) / max(len(generated), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), help="ONNX quant types to measure")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_default_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    windows = token_windows(tokenizer, evaluation_text(None, None).text, WINDOW)
    references = [torch_logprobs(model, window) for window in windows]
    dense_nll = np.concatenate([-ref[np.arange(WINDOW - 1), w[1:]] for ref, w in zip(references, windows, strict=True)])
    report: dict = {
        "model": folder.name,
        "eval": "lee.cor",
        "window": WINDOW,
        "n_windows": len(windows),
        "dense_torch_ppl": float(np.exp(dense_nll.mean())),
        "settings": {},
    }
    target = ONNXTarget()
    with tempfile.TemporaryDirectory() as tmp:
        for quant_type in args.settings:
            spec = target.resolve_quant(None, quant_type, {})
            path = Path(tmp) / f"{quant_type}.onnx"
            started = time.perf_counter()
            result = target.export(model, tokenizer, spec, path)
            export_seconds = time.perf_counter() - started
            runtime = target.open_runtime(path, device="cpu")
            report["settings"][quant_type] = {
                **score(runtime, references, windows),
                "artifact_bytes": result.artifact_bytes,
                "bits_per_weight": round(result.bits_per_weight, 4),
                "bytes_by_kind": result.quantization["bytes_by_kind"],
                "embedding_quantized": result.quantization["embedding_quantized"],
                "decode_ms_per_token": round(decode_ms_per_token(runtime, windows[0][:64]), 1),
                "export_seconds": round(export_seconds, 1),
            }
            runtime.close()
            path.unlink()
            print(json.dumps({quant_type: report["settings"][quant_type]}), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
