"""How well a budget's predictions hold: one matrix stored as an ONNX MatMulNBits option alone, its measured
mean KL against the allocator's prediction (the matrix's sensitivity times the option's relative error).

Both on the first 512 calibration tokens, the ones the sensitivities are measured on, so what differs
is only the error model (a linear KL per unit of importance-weighted squared error), not the data.

    python bench/bench_budget_predictions.py --model DIR [--matrices NAME,NAME] [--options q4-b32,q2-b128]
    python bench/bench_budget_predictions.py --model DIR --allocation BUDGET.manifest.json --uniform q2-b32

With --allocation, the whole model instead: an ONNX budget's allocation against one uniform option, the
head and the decoder swapped between them, each applied in PyTorch, mean KL on 4 calibration windows and
4 windows of lee.cor: whether the matrices' losses add up as the allocator assumes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from srcr.base.allocation import relative_error  # noqa: E402
from srcr.exporter.calibration import calibration_text, evaluation_text, load_calibration  # noqa: E402
from srcr.exporter.models import load_weights, open_source  # noqa: E402
from srcr.exporter.pruning import PruneSpec, prune_model  # noqa: E402
from srcr.exporter.sensitivity import measure_sensitivity, probe  # noqa: E402
from srcr.targets.onnx.budget import config_of, stored_weight  # noqa: E402

MATRICES = "model.embed_tokens.weight,model.layers.0.self_attn.k_proj.weight,model.layers.3.mlp.up_proj.weight"
OPTIONS = "q8-b128,q4-b32,q4-b128,q2-b32,q2-b128"


def output_error(weight: np.ndarray, approximation: np.ndarray, gram: np.ndarray) -> float:
    """||(W - Ŵ) X^T||² / ||W X^T||² with G = X^T X: the layer's relative output error on its real inputs."""
    difference = (weight - approximation).astype(np.float64)
    return float(np.einsum("ij,jk,ik->", difference, gram, difference) / np.einsum("ij,jk,ik->", weight, gram, weight))


def _input_grams(model, window: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    """X^T X of the inputs each named decoder linear sees on `window`."""
    modules = {
        f"{name}.weight": module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
    }
    grams: dict[str, np.ndarray] = {}
    hooks = []
    for name in names:
        if name in modules and name.startswith("model.layers."):

            def hook(module, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                grams[name] = (x.T @ x).numpy()

            hooks.append(modules[name].register_forward_hook(hook))
    try:
        model(window)
    finally:
        for handle in hooks:
            handle.remove()
    return grams


def _option(short: str) -> str:
    bits, block = short.removeprefix("q").split("-b")
    return f"MatMulNBits-q{bits}-wls-b{block}"


def whole_model(model, imatrix, windows: dict[str, torch.Tensor], manifest: Path, uniform: str) -> None:
    """The allocation, the uniform option and their head/decoder swaps, in PyTorch, on each set of windows."""
    import copy
    import json

    allocation = json.loads(manifest.read_text())["quantization"]["allocation"]["tensors"]
    parameters = dict(model.named_parameters())
    head = model.get_output_embeddings().weight
    # The graph names a tied head "lm_head.weight"; the model holds it once, under the embedding's name.
    head_name = next(name for name, parameter in parameters.items() if parameter is head)
    stored_as = {name: name if name in parameters else head_name for name in allocation}
    heads = [name for name in allocation if stored_as[name] == head_name]
    everywhere = {name: _option(uniform) for name in allocation}

    def applied(choice: dict[str, str]):
        candidate = copy.deepcopy(model)
        target = dict(candidate.named_parameters())
        for name, option in choice.items():
            weight = parameters[stored_as[name]].detach().float().numpy()
            importance = imatrix.get(name)
            importance = None if importance is None else np.asarray(importance, dtype=np.float32)
            values, _ = stored_weight(weight, config_of(option), importance)
            target[stored_as[name]].data.copy_(torch.from_numpy(values))
        return candidate

    def mean_kl(candidate, ids: torch.Tensor) -> float:
        total = 0.0
        for window in ids:
            reference = torch.log_softmax(model(window[None]).logits[0].float(), -1)
            got = torch.log_softmax(candidate(window[None]).logits[0].float(), -1)
            total += float((reference.exp() * (reference - got)).sum(-1).mean())
        return total / len(ids)

    variants = {
        "the allocation": allocation,
        f"uniform {uniform}": everywhere,
        f"the allocation, head {uniform}": {**allocation, **{name: everywhere[name] for name in heads}},
        f"uniform {uniform}, head as allocated": {**everywhere, **{name: allocation[name] for name in heads}},
        "head as allocated, alone": {name: allocation[name] for name in heads},
        f"head {uniform}, alone": {name: everywhere[name] for name in heads},
        "decoder as allocated, alone": {name: option for name, option in allocation.items() if name not in heads},
        f"decoder {uniform}, alone": {name: option for name, option in everywhere.items() if name not in heads},
    }
    print("| matrices rounded | " + " | ".join(f"mean KL, {label}" for label in windows) + " |")
    print("|---|" + "---|" * len(windows))
    for label, choice in variants.items():
        candidate = applied(choice)
        print(f"| {label} | " + " | ".join(f"{mean_kl(candidate, ids):.5f}" for ids in windows.values()) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--matrices", default=MATRICES)
    parser.add_argument("--options", default=OPTIONS)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--allocation", type=Path, default=None, help="an ONNX budget's manifest: the whole model")
    parser.add_argument("--uniform", default="q2-b32", help="with --allocation: the uniform option to compare")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    loaded = load_weights(open_source(args.model))
    model = loaded.model.float().eval()
    calibration = load_calibration(loaded.tokenizer, calibration_text(None, None), args.calib_samples, 512, 0)
    ids = calibration.input_ids
    # The importance matrix srcr's calibration pass collects (nothing is pruned at sparsity 0).
    imatrix = prune_model(model, ids, PruneSpec(method="magnitude", sparsity=0.0)).imatrix
    if args.allocation:
        text = evaluation_text(None, None).text
        evaluation = loaded.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        windows = {
            "4 calibration windows": ids[:4, :512],
            "4 windows of lee.cor": evaluation[: 4 * 512].reshape(4, 512),
        }
        whole_model(model, imatrix, windows, args.allocation, args.uniform)
        return
    sensitivity = measure_sensitivity(model, ids, imatrix, torch.device("cpu"))
    window = ids[:1, :512]
    parameters = dict(model.named_parameters())
    grams = _input_grams(model, window, args.matrices.split(","))
    reference = torch.log_softmax(model(window).logits[0].float(), -1)

    def measured_kl(name: str, values: np.ndarray) -> float:
        parameter = parameters[name]
        saved = parameter.data.clone()
        parameter.data.copy_(torch.from_numpy(values))
        try:
            got = torch.log_softmax(model(window).logits[0].float(), -1)
        finally:
            parameter.data.copy_(saved)
        return float((reference.exp() * (reference - got)).sum(-1).mean())

    print("| matrix | option | relative error | measured KL | predicted: two-probe curve | measured / curve | "
          "measured / linear (4-bit probe only) | measured / linear on the output error |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in args.matrices.split(","):
        weight = parameters[name].detach().float().numpy()
        importance = imatrix.get(name)  # decoder linears only, as the sensitivity stage weighs them
        importance = None if importance is None else np.asarray(importance, dtype=np.float32)
        measured_probe = sensitivity[name]
        for option in args.options.split(","):
            values, _ = stored_weight(weight, config_of(_option(option)), importance)
            error = relative_error(weight, values, importance)
            measured = measured_kl(name, values)
            curve = measured_probe.curve(error)
            linear = measured_probe.kl_per_error * error
            # The 4-bit probe's KL scaled by the output error on the real inputs (their correlations seen).
            gram = grams.get(name)
            if gram is None:
                output_ratio = "—"
            else:
                probed = probe(torch.from_numpy(weight)).numpy()
                scale = output_error(weight, values, gram) / output_error(weight, probed, gram)
                output_ratio = f"{measured / (measured_probe.probe_kl * scale):.2f}"
            print(
                f"| {name} | {option} | {error:.4g} | {measured:.3g} | {curve:.3g} | {measured / curve:.2f} | "
                f"{measured / linear:.2f} | {output_ratio} |"
            )


if __name__ == "__main__":
    main()
