"""The whole model, not one layer: SparseGPT 50% then llama.cpp's Q4_0 (with the imatrix, Q4_1 for the
first eighth of ffn_down as llama.cpp's Q4_0 files write), against srcr's joint SparseGPT + GPTQ, each
pass calibrated layer by layer as srcr runs it (every layer on the outputs of the ones before it, as
they were pruned, or pruned and rounded).

Only the decoder's linears differ between the candidates: embeddings, norms and the head stay float32
in PyTorch, so what this measures is the solvers and the error they carry across layers, not the file
format. Mean KL(dense || candidate) over windows of lee.cor, in PyTorch. SmolLM2's weights carry Q4_1
rounding (relative figures only).

    python bench/bench_gptq_wholemodel.py [--samples 16] [--seq-len 512] [--windows 4] [--joint-percdamp 0.01,0.1]
    python bench/bench_gptq_wholemodel.py --sparsity 0 --model DIR   # GPTQ alone against imatrix rounding
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from bench_gptq_layerwise import ggml_library, llama_cpp_quantized  # noqa: E402

from srcr.exporter.calibration import calibration_text, evaluation_text, load_calibration  # noqa: E402
from srcr.exporter.models import load_weights, open_source  # noqa: E402
from srcr.exporter.pruning import PruneSpec, prune_model  # noqa: E402


def mean_kl(dense, candidate, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            reference = torch.log_softmax(dense(window.unsqueeze(0)).logits[0].float(), -1)
            got = torch.log_softmax(candidate(window.unsqueeze(0)).logits[0].float(), -1)
            total += float((reference.exp() * (reference - got)).sum(-1).sum())
            count += window.numel()
    return total / count


def round_with_llama_cpp(model, imatrix: dict, with_imatrix: bool, promote: bool = True) -> None:
    """Every decoder linear through llama.cpp's quantizer, with the type llama.cpp's Q4_0 file gives it."""
    library = ggml_library()
    layers = model.model.layers
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            key = f"model.layers.{index}.{name}.weight"
            promoted = promote and with_imatrix and name == "mlp.down_proj" and index < len(layers) // 8
            weights = torch.from_numpy(imatrix[key]) if with_imatrix else None
            rounded = llama_cpp_quantized(library, module.weight.detach(), weights, "Q4_1" if promoted else "Q4_0")
            module.weight.data.copy_(rounded)


def joint_on_unrounded_inputs(dense, calibration: torch.Tensor, sparsity: float):
    """The joint SparseGPT + GPTQ solve of every layer, each calibrated on the inputs SparseGPT alone gives
    it (pruned, unrounded predecessors) instead of the inputs of its rounded predecessors: the test of
    whether the joint pass loses by fitting layers to error that is already there."""
    from srcr.exporter.pruning.driver import (
        calibrate_layer,
        capture_layer_inputs,
        decoder_layers,
        inference_setup,
        run_layer,  # noqa: I001
    )
    from srcr.exporter.pruning.registry import method_class

    joint, shadow = copy.deepcopy(dense), copy.deepcopy(dense)
    plain_spec = PruneSpec(method="sparsegpt", sparsity=sparsity)
    joint_spec = PruneSpec(method="sparsegpt", sparsity=sparsity, grid="Q4_0")
    method = method_class("sparsegpt")
    layers, shadow_layers = decoder_layers(joint), decoder_layers(shadow)
    with torch.no_grad(), inference_setup(joint), inference_setup(shadow):
        inputs, layer_kwargs = capture_layer_inputs(shadow, shadow_layers, calibration, torch.device("cpu"))
        for index in range(len(layers)):
            for spec, layer in ((plain_spec, shadow_layers[index]), (joint_spec, layers[index])):
                for group in calibrate_layer(layer, inputs, layer_kwargs[index], spec, method):
                    group.method.prune()
            inputs = run_layer(shadow_layers[index], inputs, layer_kwargs[index])
    return joint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5, help="0: GPTQ alone against rounding alone")
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--skip-joint", action="store_true", help="leave out the joint pass (minutes)")
    parser.add_argument(
        "--unrounded-inputs", action="store_true", help="also: the joint solve fed SparseGPT-only layer inputs"
    )
    parser.add_argument(
        "--joint-percdamp",
        default="0.01",
        help="comma-separated Hessian dampenings (fractions of the mean diagonal) for the joint pass; 0.01 is srcr's",
    )
    args = parser.parse_args()
    loaded = load_weights(open_source(args.model))
    dense = loaded.model.float().eval()
    tokenizer = loaded.tokenizer
    calibration = load_calibration(tokenizer, calibration_text(None, None), args.samples, args.seq_len, 0).input_ids
    ids = tokenizer(evaluation_text(None, None).text, add_special_tokens=False)["input_ids"]
    windows = torch.tensor(ids[: args.windows * 512]).reshape(args.windows, 512)

    pruned = copy.deepcopy(dense)
    report = prune_model(pruned, calibration, PruneSpec(method="sparsegpt", sparsity=args.sparsity))
    results = {"SparseGPT, unquantized": mean_kl(dense, pruned, windows)}
    for label, with_imatrix, promote in (
        ("no imatrix", False, False),
        ("with imatrix (Q4_1 ffn_down 0-2, as llama.cpp writes)", True, True),
        ("with imatrix, every matrix Q4_0", True, False),
    ):
        rounded = copy.deepcopy(pruned)
        round_with_llama_cpp(rounded, report.imatrix, with_imatrix, promote)
        results[f"+ llama.cpp Q4_0 {label}"] = mean_kl(dense, rounded, windows)
        del rounded
    for percdamp in [] if args.skip_joint else [float(value) for value in args.joint_percdamp.split(",")]:
        joint = copy.deepcopy(dense)
        spec = PruneSpec(method="sparsegpt", sparsity=args.sparsity, grid="Q4_0", percdamp=percdamp)
        prune_model(joint, calibration, spec)
        results[f"joint SparseGPT + GPTQ Q4_0, dampening {percdamp:g}"] = mean_kl(dense, joint, windows)
        del joint
    if args.unrounded_inputs:
        joint = joint_on_unrounded_inputs(dense, calibration, args.sparsity)
        results["joint SparseGPT + GPTQ Q4_0, each layer fed SparseGPT-only inputs"] = mean_kl(dense, joint, windows)
    print(f"\n{args.samples} x {args.seq_len} calibration tokens, {args.windows} x 512 tokens of lee.cor")
    print("| decoder linears | mean KL to the dense model |\n|---|---|")
    for label, value in results.items():
        print(f"| {label} | {value:.4g} |")


if __name__ == "__main__":
    main()
