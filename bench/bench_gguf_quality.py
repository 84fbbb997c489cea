"""GGUF quality yardstick: srcr's F32 / Q4_K_M exports of the dense SmolLM2, run by llama.cpp.

1. Converts the dense default model to an F32 GGUF and checks it against PyTorch on one window
   (max |logit diff|, KL): it is the reference only once it reproduces the model.
2. Collects an importance matrix (mean x^2 per input column of every decoder linear) with forward
   hooks on lee_background.cor windows, as the pruning engine does in the pipeline.
3. Exports Q4_K_M without and with the imatrix, runs all artifacts through srcr's llama.cpp runtime
   on lee.cor in 512-token windows (no BOS, the tokenizer adds none) and prints JSON: mean KL to the
   F32 reference, same-top-token rate, perplexity, bits per weight, type mix.

    .venv/bin/python bench/bench_gguf_quality.py [--quant-type Q4_K_M] [--calib-windows 128]
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

from srcr.exporter.calibration import calibration_text, evaluation_text  # noqa: E402
from srcr.exporter.models import HINTS_FILE, ensure_default_checkpoint  # noqa: E402
from srcr.targets.gguf.target import GGUFTarget  # noqa: E402

WINDOW = 512


def token_windows(tokenizer, text: str, window: int, limit: int | None = None) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [ids[start : start + window] for start in range(0, len(ids) - window + 1, window)]
    return windows[:limit] if limit else windows


def collect_imatrix(model, windows: list[list[int]], include_lm_head: bool) -> dict[str, np.ndarray]:
    """Mean of x_j^2 over all calibration tokens for the input of each linear layer."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return accumulate

    handles = [
        module.register_forward_hook(hook(f"{name}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and (include_lm_head or ".layers." in name)
    ]
    # Without the lm_head's statistics the decoder alone gives every input needed, a fifth cheaper.
    forward = model if include_lm_head else model.get_decoder()
    try:
        with torch.no_grad():
            for index, window in enumerate(windows):
                forward(torch.tensor([window]))
                log(f"imatrix window {index + 1}/{len(windows)}")
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def torch_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def compare(reference: np.ndarray, candidate: np.ndarray, tokens: list[int]) -> dict[str, float]:
    """KL(reference || candidate) per position, top-1 agreement, and the candidate's NLL of the text."""
    kl = (np.exp(reference) * (reference - candidate)).sum(-1)
    same_top = reference.argmax(-1) == candidate.argmax(-1)
    nll = -candidate[np.arange(len(tokens) - 1), tokens[1:]]
    return {"kl": kl, "same_top": same_top, "nll": nll}


def evaluate(runtime, reference_runtime, windows: list[list[int]]) -> dict[str, float]:
    kls, tops, nlls = [], [], []
    for window in windows:
        reference = reference_runtime.logprobs(window).astype(np.float64)
        candidate = runtime.logprobs(window).astype(np.float64)
        figures = compare(reference, candidate, window)
        kls.append(figures["kl"])
        tops.append(figures["same_top"])
        nlls.append(figures["nll"])
    return {
        "mean_kl": float(np.concatenate(kls).mean()),
        "same_top_token": float(np.concatenate(tops).mean()),
        "ppl": float(np.exp(np.concatenate(nlls).mean())),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quant-type", default="Q4_K_M")
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--lm-head-imatrix", action="store_true", help="also weight the tied output matrix")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = ensure_default_checkpoint()
    hints = json.loads((folder / HINTS_FILE).read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    target = GGUFTarget()
    eval_windows = token_windows(tokenizer, evaluation_text(None, None).text, WINDOW)
    report: dict = {"model": folder.name, "eval": "lee.cor", "window": WINDOW, "n_windows": len(eval_windows)}

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        reference_path = Path(tmp) / "f32.gguf"
        target.export(model, tokenizer, target.resolve_quant(None, "F32", {}), reference_path, hints=hints)
        reference = target.open_runtime(reference_path, device="cpu")
        parity_window = eval_windows[0]
        exact = torch_logprobs(model, parity_window)
        served = reference.logprobs(parity_window).astype(np.float64)
        with torch.no_grad():
            torch_logits = model(torch.tensor([parity_window])).logits[0].numpy()
        gguf_logits = reference.logits(parity_window)
        report["f32_parity"] = {
            "max_abs_logit_diff": float(np.abs(torch_logits - gguf_logits).max()),
            "mean_kl": float(compare(exact, served, parity_window)["kl"].mean()),
            "same_top_token": float(compare(exact, served, parity_window)["same_top"].mean()),
        }
        dense_nll = np.concatenate([-torch_logprobs(model, w)[np.arange(WINDOW - 1), w[1:]] for w in eval_windows])
        report["dense_torch_ppl"] = float(np.exp(dense_nll.mean()))
        report["f32_gguf"] = evaluate(reference, reference, eval_windows)

        log("F32 reference evaluated")
        calib_windows = token_windows(tokenizer, calibration_text(None, None).text, WINDOW, args.calib_windows)
        imatrix = collect_imatrix(model, calib_windows, include_lm_head=args.lm_head_imatrix)
        report["imatrix"] = {"calibration": "lee_background.cor", "tokens": WINDOW * len(calib_windows)}

        spec = target.resolve_quant(None, args.quant_type, {})
        for label, matrix in (("no_imatrix", None), ("imatrix", imatrix)):
            log(f"export {spec.quant_type} {label}")
            path = Path(tmp) / f"{label}.gguf"
            result = target.export(model, tokenizer, spec, path, imatrix=matrix, hints=hints)
            runtime = target.open_runtime(path, device="cpu")
            report[f"{spec.quant_type}_{label}"] = {
                **evaluate(runtime, reference, eval_windows),
                "bits_per_weight": result.bits_per_weight,
                "artifact_bytes": result.artifact_bytes,
                "type_mix": result.quantization["type_mix"],
                "imatrix_entries": result.quantization["imatrix_entries"],
            }
            runtime.close()
        reference.close()
        report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
