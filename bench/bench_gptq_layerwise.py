"""Why srcr's joint SparseGPT + GPTQ file loses to SparseGPT + llama.cpp's Q4_0 at 50% on SmolLM2: the
layer-wise error of each linear, on the same calibration inputs.

For every linear of the chosen decoder layers of the dense model, with H = X^T X from its calibration
inputs X, the relative output error ‖(W - Ŵ) X‖² / ‖W X‖² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) of:

  sparsegpt            SparseGPT 50% (srcr's solver), unquantized: the floor pruning alone sets
  +llama.cpp Q4_0      that, quantized by llama.cpp's own Q4_0 (ggml_quantize_chunk), no imatrix
  +llama.cpp imatrix   the same with the importance matrix (mean x² per input column, as srcr passes it)
  +srcr RTN            that, rounded to nearest on srcr's Q4_0 grid (its closed-form scale)
  joint GPTQ           srcr's joint pass (one sweep prunes and rounds onto the Q4_0 grid)
  (--with-q4-1)        llama.cpp's Q4_1 with the imatrix, and the joint pass on the Q4_1 grid

Inputs are the dense model's (every layer sees unpruned inputs), so the figures compare the solvers
on one linear at a time, with no error carried across layers. SmolLM2's embedded weights were
dequantized from a Q4_1 file (blocks of 32), which flatters any 4-bit grid of block 32: relative
figures only.

    python bench/bench_gptq_layerwise.py [--layers 0,10,20,29] [--samples 32] [--seq-len 512] [--held-out 4]

--held-out N fits every candidate on the calibration inputs and scores it on N windows of lee.cor: the
in-sample error is what GPTQ minimizes, the held-out one what a deployed file meets.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from srcr.base.grids import grid  # noqa: E402
from srcr.exporter.calibration import calibration_text, evaluation_text, load_calibration  # noqa: E402
from srcr.exporter.models import load_weights, open_source  # noqa: E402
from srcr.exporter.pruning.gptq import quantize_columnwise, round_to_nearest  # noqa: E402
from srcr.exporter.pruning.sparsegpt import inverse_hessian_upper, prune_columnwise  # noqa: E402
from srcr.exporter.pruning.spec import DEFAULT_PERCDAMP  # noqa: E402

# ggml type id -> bytes per block of 32 weights (fp16 scale [+ fp16 minimum] + 16 bytes of nibbles)
GGML_TYPES = {"Q4_0": (2, 18), "Q4_1": (3, 20)}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip


def ggml_library() -> ctypes.CDLL:
    import llama_cpp

    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                            ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]  # fmt: skip
    for name in GGML_TYPES:
        getattr(library, f"dequantize_row_{name.lower()}").argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return library


def llama_cpp_quantized(
    library: ctypes.CDLL, weight: torch.Tensor, imatrix: torch.Tensor | None, name: str = "Q4_0"
) -> torch.Tensor:
    """`weight` through llama.cpp's own quantizer for type `name` and back: what llama-quantize writes."""
    rows, columns = weight.shape
    type_id, block_bytes = GGML_TYPES[name]
    source = np.ascontiguousarray(weight.numpy(), dtype=np.float32)
    packed = np.zeros(rows * columns // 32 * block_bytes, dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix.numpy(), dtype=np.float32)
    library.ggml_quantize_chunk(type_id, source.ctypes.data, packed.ctypes.data, 0, rows, columns,
                                None if weights is None else weights.ctypes.data)  # fmt: skip
    out = np.empty(rows * columns, dtype=np.float32)
    getattr(library, f"dequantize_row_{name.lower()}")(packed.ctypes.data, out.ctypes.data, rows * columns)
    return torch.from_numpy(out.reshape(rows, columns))


def capture_hessians(model, input_ids: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """H = mean x xᵀ over every calibration token, per linear of `layers` (float64 sums)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for index in layers:
        for name in LINEARS:
            module = model.model.layers[index].get_submodule(name)
            key = f"{index}.{name}"

            def hook(_module, args, _output, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + x.T @ x
                counts[key] = counts.get(key, 0) + x.shape[0]

            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for sample in input_ids:
            model(sample.unsqueeze(0))
    for handle in handles:
        handle.remove()
    return {key: (value / counts[key]).float() for key, value in sums.items()}


def relative_error(weight: torch.Tensor, approximation: torch.Tensor, hessian: torch.Tensor) -> float:
    delta = (weight - approximation).double()
    h = hessian.double()
    return float(torch.einsum("ij,jk,ik->", delta, h, delta) / torch.einsum("ij,jk,ik->", weight.double(), h,
                                                                             weight.double()))  # fmt: skip


def measure(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    library: ctypes.CDLL,
    with_q4_1: bool,
    scored_on: torch.Tensor | None = None,
) -> dict[str, float]:
    """Each candidate fitted on `hessian`; its error on `scored_on` (held-out inputs) when given."""
    q4_0 = grid("Q4_0")
    hinv, dead = inverse_hessian_upper(hessian.clone(), DEFAULT_PERCDAMP)
    weight = weight.clone()
    weight[:, dead] = 0
    pruned = prune_columnwise(weight, hinv, sparsity, None)
    imatrix = hessian.diagonal().clone()
    joint, _, _ = quantize_columnwise(weight, hinv, q4_0, sparsity)
    rtn = round_to_nearest(pruned, q4_0).dequantize()
    candidates = {
        "sparsegpt": pruned,
        "+llama.cpp Q4_0": llama_cpp_quantized(library, pruned, None),
        "+llama.cpp imatrix": llama_cpp_quantized(library, pruned, imatrix),
        "+srcr RTN": rtn,
        "joint GPTQ": joint,
    }
    if with_q4_1:  # what llama.cpp's Q4_0 file writes for the first eighth of ffn_down given an imatrix
        candidates["+llama.cpp Q4_1 imatrix"] = llama_cpp_quantized(library, pruned, imatrix, "Q4_1")
        candidates["joint GPTQ Q4_1"] = quantize_columnwise(weight, hinv, grid("Q4_1"), sparsity)[0]
    scoring = hessian if scored_on is None else scored_on
    return {label: relative_error(weight, value, scoring) for label, value in candidates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="0,10,20,29")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--with-q4-1", action="store_true", help="also Q4_1, llama.cpp's and GPTQ's")
    parser.add_argument("--linears", default="", help="only these, e.g. mlp.down_proj")
    parser.add_argument(
        "--held-out", type=int, default=0, metavar="WINDOWS", help="score on WINDOWS x 512 tokens of lee.cor"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_weights(open_source(None))
    model = loaded.model.float().eval()
    calibration = load_calibration(loaded.tokenizer, calibration_text(None, None), args.samples, args.seq_len, 0)
    layers = [int(part) for part in args.layers.split(",")]
    hessians = capture_hessians(model, calibration.input_ids, layers)
    held_out = {}
    if args.held_out:
        ids = loaded.tokenizer(evaluation_text(None, None).text, add_special_tokens=False)["input_ids"]
        windows = torch.tensor(ids[: args.held_out * 512]).reshape(args.held_out, 512)
        held_out = capture_hessians(model, windows, layers)
    library = ggml_library()
    rows = []
    for key, hessian in hessians.items():
        index, name = key.split(".", 1)
        weight = model.model.layers[int(index)].get_submodule(name).weight.detach().float()
        if args.linears and name not in args.linears.split(","):
            continue
        errors = measure(weight, hessian, args.sparsity, library, args.with_q4_1, held_out.get(key))
        rows.append({"linear": key, **errors})
        print(key, " ".join(f"{label}={value:.4g}" for label, value in errors.items()), flush=True)
    labels = [label for label in rows[0] if label != "linear"]
    print("\n| linear | " + " | ".join(labels) + " |")
    print("|---|" + "---|" * len(labels))
    for row in rows:
        print(f"| {row['linear']} | " + " | ".join(f"{row[label]:.4f}" for label in labels) + " |")
    medians = {label: float(np.median([row[label] for row in rows])) for label in labels}
    print("| **median** | " + " | ".join(f"**{medians[label]:.4f}**" for label in labels) + " |")
    ratio = [row["joint GPTQ"] / row["+llama.cpp imatrix"] for row in rows]
    worse = sum(r > 1 for r in ratio)
    print(f"\njoint GPTQ / (SparseGPT + llama.cpp imatrix): median {np.median(ratio):.3f}, "
          f"range {min(ratio):.3f}-{max(ratio):.3f}, joint worse on {worse} of {len(ratio)}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
