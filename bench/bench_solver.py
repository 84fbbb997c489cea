"""Pruning-solver time per decoder layer at Llama-3.1-8B shapes, against the published algorithm.

One decoder layer's seven linears (hidden 4096, intermediate 14336, 32 heads, 8 KV heads of 128)
with synthetic weights, fed synthetic calibration activations (samples x seq_len tokens per
distinct input: low-rank correlated, with heavy-tailed per-channel scales as LLM activations
have; bf16 on CUDA, float32 on CPU; made before any timing). For each setting it times:

- srcr's engine (exporter.pruning): one Hessian per distinct input (q/k/v and gate/up share),
  one inverse per Hessian, the lazy solver over the stacked rows (TF32 Hessian on CUDA);
- the baseline: the published algorithm as the authors run it: a float32 Hessian and an inverse
  per linear, then the column-by-column solver (exporter.pruning.sparsegpt.prune_columnwise).

and reports the reconstruction error sum ||W X - W' X||^2 of each, computed from float32
Hessians at full precision (float64 on CPU), and the ratios. Wanda runs through the same engine
for comparison. On CPU the shapes default to 1/8 (hidden 512, intermediate 1792, 4 heads, 1 KV
head) with 16 samples; `--precision-check` adds emulated TF32/bf16 Hessian inputs on CPU;
`--leaf-variants` times each in-leaf solver (always on CUDA). `--real-layers` measures instead
each method's reconstruction error on four real SmolLM2-135M layers over lee_background text.

    .venv/bin/python bench/bench_solver.py [--device auto|cpu|cuda] [--scale 8] [--samples 16]
        [--seq-len 2048] [--repeats 3] [--json out.json] [--precision-check] [--leaf-variants] [--real-layers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srcr.exporter.pruning.registry import METHODS  # noqa: E402
from srcr.exporter.pruning.sparsegpt import inverse_hessian_upper, prune_columnwise  # noqa: E402
from srcr.exporter.pruning.spec import PruneSpec  # noqa: E402
from srcr.exporter.pruning.stats import InputStatistics  # noqa: E402

LLAMA_31_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
SETTINGS = [
    ("sparsegpt", PruneSpec("sparsegpt", 0.5)),
    ("sparsegpt", PruneSpec("sparsegpt", 0.0, (2, 4))),
    ("wanda", PruneSpec("wanda", 0.5)),
]


@dataclass(frozen=True)
class LayerShape:
    hidden: int
    intermediate: int
    q_rows: int
    kv_rows: int

    @classmethod
    def llama_31_8b(cls, scale: int) -> LayerShape:
        heads = LLAMA_31_8B["heads"] // scale
        kv_heads = max(1, LLAMA_31_8B["kv_heads"] // scale)
        return cls(
            hidden=LLAMA_31_8B["hidden"] // scale,
            intermediate=LLAMA_31_8B["intermediate"] // scale,
            q_rows=heads * LLAMA_31_8B["head_dim"],
            kv_rows=kv_heads * LLAMA_31_8B["head_dim"],
        )

    def inputs(self) -> dict[str, dict[str, int]]:
        """Distinct layer inputs -> the linears that read them (name -> out_features)."""
        return {
            "attention_in": {"q_proj": self.q_rows, "k_proj": self.kv_rows, "v_proj": self.kv_rows},
            "attention_out": {"o_proj": self.hidden},
            "mlp_in": {"gate_proj": self.intermediate, "up_proj": self.intermediate},
            "mlp_hidden": {"down_proj": self.hidden},
        }

    def width(self, input_name: str) -> int:
        return self.intermediate if input_name == "mlp_hidden" else self.hidden


def synthetic_activations(width: int, seed: int, samples: int, seq_len: int, dtype, device) -> list[torch.Tensor]:
    """Deterministic [seq_len, width] samples (z + f B) * s: f a 32-factor shared signal, s log-normal
    channel scales, so columns are correlated and a few channels are large. Made before any timing."""
    generator = torch.Generator(device=device).manual_seed(seed)
    factors = torch.randn(32, width, generator=generator, device=device) * 0.5
    scales = torch.exp(torch.randn(width, generator=generator, device=device))
    chunks = []
    for _ in range(samples):
        z = torch.randn(seq_len, width, generator=generator, device=device)
        f = torch.randn(seq_len, 32, generator=generator, device=device)
        chunks.append(((z + f @ factors) * scales).to(dtype))
    return chunks


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_weights(shape: LayerShape, device: torch.device) -> dict[str, torch.Tensor]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    weights = {}
    for input_name, linears in shape.inputs().items():
        for name, rows in linears.items():
            weights[name] = (torch.randn(rows, shape.width(input_name), generator=generator) * 0.02).to(device)
    return weights


def as_linear(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
    linear.weight.data.copy_(weight)
    return linear


def exact_hessians(shape, activations, samples, device, dtype) -> dict[str, torch.Tensor]:
    """2/N X^T X per distinct input at full precision: the yardstick for reconstruction error."""
    hessians = {}
    with full_precision():
        for input_name, source in activations.items():
            total = torch.zeros(shape.width(input_name), shape.width(input_name), dtype=dtype, device=device)
            for sample in range(samples):
                x = source[sample].to(dtype)
                total.addmm_(x.T, x)
            hessians[input_name] = total * (2.0 / sum(chunk.shape[0] for chunk in source))
    return hessians


@contextmanager
def full_precision() -> Iterator[None]:
    """float32 matmuls without TF32 on CUDA, for the yardstick and the baseline."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor, tokens: int) -> float:
    """sum ||W X - W' X||^2 over all tokens = N/2 tr(dW H dW^T)."""
    delta = (dense - pruned).to(hessian.dtype)
    return float((delta @ hessian * delta).sum()) * tokens / 2


def run_engine(spec, shape, weights, activations, samples, device, input_rounding=None, leaf=None):
    """srcr's engine on one layer: returns (hessian seconds, solve seconds, pruned weights)."""
    method = METHODS[spec.method]
    options = {"leaf": leaf} if leaf else {}
    groups = {}
    for input_name, linears in shape.inputs().items():
        members = {name: as_linear(weights[name]) for name in linears}
        first = next(iter(members.values()))
        statistics = InputStatistics(first.in_features, first.weight.device)
        groups[input_name] = method(members, spec, statistics, **options)
    synchronize(device)
    start = time.perf_counter()
    for sample in range(samples):
        for input_name, group in groups.items():
            x = activations[input_name][sample]
            x = x if input_rounding is None else input_rounding(x)
            flat = x.reshape(-1, x.shape[-1]).float()
            group.statistics.add(flat)
            group.observe(flat)
    synchronize(device)
    calibrated = time.perf_counter()
    for group in groups.values():
        group.prune()
    synchronize(device)
    solved = time.perf_counter()
    pruned = {name: linear.weight.detach() for group in groups.values() for name, linear in group.linears.items()}
    return calibrated - start, solved - calibrated, pruned


def run_baseline(spec, shape, weights, activations, samples, device):
    """The authors' flow: a float32 Hessian and an inverse per linear, then column by column."""
    hessians = {
        name: torch.zeros(shape.width(input_name), shape.width(input_name), device=device)
        for input_name, linears in shape.inputs().items()
        for name in linears
    }
    seen = 0
    synchronize(device)
    start = time.perf_counter()
    with full_precision():
        for sample in range(samples):
            chunks = {input_name: source[sample].float() for input_name, source in activations.items()}
            tokens = next(iter(chunks.values())).shape[0]
            for input_name, linears in shape.inputs().items():
                for name in linears:
                    hessian = hessians[name]
                    hessian.mul_(seen / (seen + tokens))
                    x = chunks[input_name] * (2.0 / (seen + tokens)) ** 0.5
                    hessian.addmm_(x.T, x)
            seen += tokens
    synchronize(device)
    calibrated = time.perf_counter()
    pruned = {}
    for name, hessian in hessians.items():
        hinv, dead = inverse_hessian_upper(hessian, spec.percdamp)
        weight = weights[name].clone()
        weight[:, dead] = 0
        pruned[name] = prune_columnwise(weight, hinv, spec.sparsity, spec.pattern, spec.block_size)
    synchronize(device)
    return calibrated - start, time.perf_counter() - calibrated, pruned


def median_run(repeats: int, run) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Median accumulate and solve seconds over `repeats` runs (this machine is noisy); the last result."""
    hessian_s, solve_s = [], []
    for _ in range(max(1, repeats)):
        hessian, solve, pruned = run()
        hessian_s.append(hessian)
        solve_s.append(solve)
    return statistics.median(hessian_s), statistics.median(solve_s), pruned


def layer_error(pruned, weights, shape, hessians, tokens) -> float:
    return sum(
        reconstruction_error(weights[name], pruned[name], hessians[input_name], tokens)
        for input_name, linears in shape.inputs().items()
        for name in linears
    )


def round_mantissa(bits: int):
    """Round float32 to `bits` explicit mantissa bits (10 = TF32, 7 = bf16), nearest-even."""
    drop = 23 - bits

    def rounding(x: torch.Tensor) -> torch.Tensor:
        raw = x.float().contiguous().view(torch.int32)
        half = 1 << (drop - 1)
        lsb = (raw >> drop) & 1
        return ((raw + half - 1 + lsb) & ~((1 << drop) - 1)).view(torch.float32)

    return rounding


def leaf_variant_rows(row, spec, shape, weights, activations, samples, device, yardstick) -> list[dict]:
    """The engine with each in-leaf solver forced, to pick the device default from measurements."""
    variants = [(16, "columns"), (32, "triangular"), (128, "triangular")] if spec.pattern is None else []
    if spec.pattern is not None:
        variants = [(spec.pattern[1], "columns"), (spec.pattern[1], "triangular")]
    rows = []
    for leaf in variants:
        hessian_s, solve_s, pruned = run_engine(spec, shape, weights, activations, samples, device, leaf=leaf)
        variant = {key: row[key] for key in ("pattern", "device", "scale", "tokens")}
        variant |= {
            "method": f"sparsegpt[{leaf[1]}/{leaf[0]}]",
            "hessian_s": hessian_s,
            "solve_s": solve_s,
            "total_s": hessian_s + solve_s,
            "sparsity": sparsity_of(pruned),
            "error": layer_error(pruned, weights, shape, yardstick, row["tokens"]),
        }
        if "baseline_total_s" in row:
            variant["speedup"] = row["baseline_total_s"] / variant["total_s"]
            variant["solve_speedup"] = row["baseline_solve_s"] / solve_s
            variant["error_ratio"] = variant["error"] / row["baseline_error"]
        rows.append(variant)
    return rows


def sparsity_of(pruned: dict[str, torch.Tensor]) -> float:
    zeros = sum(int((weight == 0).sum()) for weight in pruned.values())
    return zeros / sum(weight.numel() for weight in pruned.values())


def pattern_label(spec: PruneSpec) -> str:
    return f"{spec.pattern[0]}:{spec.pattern[1]}" if spec.pattern else f"{spec.sparsity:.0%}"


def real_layer_errors(layer_indices: tuple[int, ...], samples: int, seq_len: int) -> list[dict]:
    """sum ||W X - W' X||^2 per decoder layer of the embedded SmolLM2-135M on lee_background text,
    for each method and pattern; SparseGPT also with the column-by-column solver."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srcr.exporter.calibration import calibration_text, load_calibration
    from srcr.exporter.models import ensure_default_checkpoint
    from srcr.exporter.pruning.driver import calibrate_layer, capture_layer_inputs, run_layer

    folder = ensure_default_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = load_calibration(
        AutoTokenizer.from_pretrained(folder), calibration_text(None, None), samples, seq_len, seed=0
    ).input_ids
    layers = model.model.layers
    rows = []
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, layers[0], ids, torch.device("cpu"))
        for index in range(max(layer_indices) + 1):
            layer = layers[index]
            if index in layer_indices:
                outputs, seen = run_recording_inputs(layer, inputs, kwargs)
                hessians = {name: 2 * torch.cat(xs).T @ torch.cat(xs) / ids.numel() for name, xs in seen.items()}
                dense = {name: module.weight.detach() for name, module in layer.named_modules() if name in seen}
                for label, spec in (("50%", PruneSpec("x", 0.5)), ("2:4", PruneSpec("x", 0.0, (2, 4)))):
                    row = {"layer": index, "pattern": label}
                    for method in ("magnitude", "wanda", "sparsegpt"):
                        pruned_layer = copy.deepcopy(layer)
                        for group in calibrate_layer(pruned_layer, inputs, kwargs, spec, METHODS[method]):
                            group.method.prune()
                        pruned = dict(pruned_layer.named_modules())
                        row[method] = sum(
                            reconstruction_error(dense[name], pruned[name].weight.detach(), hessians[name], ids.numel())
                            for name in seen
                        )
                    columnwise = 0.0
                    for name, hessian in hessians.items():
                        hinv, dead = inverse_hessian_upper(hessian.float(), spec.percdamp)
                        weight = dense[name].clone()
                        weight[:, dead] = 0
                        pruned_weight = prune_columnwise(weight, hinv, spec.sparsity, spec.pattern)
                        columnwise += reconstruction_error(dense[name], pruned_weight, hessian, ids.numel())
                    row["sparsegpt_columnwise"] = columnwise
                    rows.append(row)
                inputs = outputs
            else:
                inputs = run_layer(layer, inputs, kwargs)
    return rows


def run_recording_inputs(layer, inputs, kwargs) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """The layer's outputs, and the float64 inputs [tokens, in] each of its linears saw."""
    from srcr.exporter.pruning.driver import run_layer

    seen: dict[str, list[torch.Tensor]] = {}

    def record(name: str):
        def hook(module, args, output):
            seen.setdefault(name, []).append(args[0].reshape(-1, module.in_features).double())

        return hook

    handles = [
        module.register_forward_hook(record(name))
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    ]
    outputs = run_layer(layer, inputs, kwargs)
    for handle in handles:
        handle.remove()
    return outputs, seen


def print_real_layer_errors(rows: list[dict]) -> None:
    table = Table(title="reconstruction error sum ||WX - W'X||^2 per SmolLM2-135M layer (lee_background)")
    for column in ("layer", "pattern", "magnitude", "wanda", "sparsegpt", "sparsegpt / magnitude", "lazy / columnwise"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            str(row["layer"]),
            row["pattern"],
            f"{row['magnitude']:.4g}",
            f"{row['wanda']:.4g}",
            f"{row['sparsegpt']:.4g}",
            f"{row['sparsegpt'] / row['magnitude']:.3f}",
            f"{row['sparsegpt'] / row['sparsegpt_columnwise']:.5f}",
        )
    Console(stderr=True, width=150).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--scale", type=int, default=None, help="divide the 8B widths by this (CPU: 8, CUDA: 1)")
    parser.add_argument("--samples", type=int, default=None, help="calibration samples (CPU: 16, CUDA: 128)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each solver; medians are reported")
    parser.add_argument("--no-baseline", action="store_true", help="skip the column-by-column baseline")
    parser.add_argument("--precision-check", action="store_true", help="emulated TF32/bf16 Hessian inputs")
    parser.add_argument("--leaf-variants", action="store_true", help="also time each in-leaf solver (default on CUDA)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--real-layers", action="store_true", help="instead: every method on real SmolLM2 layers (CPU)")
    args = parser.parse_args()

    if args.real_layers:
        rows = real_layer_errors((0, 8, 20, 29), samples=args.samples or 16, seq_len=256)
        print_real_layer_errors(rows)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        print(json.dumps(rows, indent=2))
        return

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    scale = args.scale or (1 if device.type == "cuda" else 8)
    samples = args.samples or (128 if device.type == "cuda" else 16)
    shape = LayerShape.llama_31_8b(scale)
    tokens = samples * args.seq_len
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # what an 8B / a small model runs in
    activations = {
        input_name: synthetic_activations(shape.width(input_name), seed, samples, args.seq_len, dtype, device)
        for seed, input_name in enumerate(shape.inputs(), start=1)
    }
    weights = make_weights(shape, device)
    yardstick = exact_hessians(
        shape, activations, samples, device, torch.float64 if device.type == "cpu" else torch.float32
    )

    rows = []
    for method, spec in SETTINGS:
        hessian_s, solve_s, pruned = median_run(
            args.repeats, lambda spec=spec: run_engine(spec, shape, weights, activations, samples, device)
        )
        row = {
            "method": method,
            "pattern": pattern_label(spec),
            "device": device.type,
            "scale": f"1/{scale}" if scale > 1 else "1",
            "tokens": tokens,
            "hessian_s": hessian_s,
            "solve_s": solve_s,
            "total_s": hessian_s + solve_s,
            "sparsity": sparsity_of(pruned),
            "error": layer_error(pruned, weights, shape, yardstick, tokens),
        }
        if method == "sparsegpt" and not args.no_baseline:
            base_hessian_s, base_solve_s, base_pruned = median_run(
                args.repeats, lambda spec=spec: run_baseline(spec, shape, weights, activations, samples, device)
            )
            row |= {
                "baseline_hessian_s": base_hessian_s,
                "baseline_solve_s": base_solve_s,
                "baseline_total_s": base_hessian_s + base_solve_s,
                "baseline_error": layer_error(base_pruned, weights, shape, yardstick, tokens),
            }
            row["speedup"] = row["baseline_total_s"] / row["total_s"]
            row["solve_speedup"] = base_solve_s / solve_s
            row["error_ratio"] = row["error"] / row["baseline_error"]
        rows.append(row)
        if method == "sparsegpt" and (args.leaf_variants or device.type == "cuda"):
            rows.extend(leaf_variant_rows(row, spec, shape, weights, activations, samples, device, yardstick))
        if method == "sparsegpt" and args.precision_check and device.type == "cpu":
            for label, bits in (("tf32-emulated", 10), ("bf16-emulated", 7)):
                _, _, rounded = run_engine(spec, shape, weights, activations, samples, device, round_mantissa(bits))
                row[f"error_ratio_{label}"] = layer_error(rounded, weights, shape, yardstick, tokens) / row["error"]

    table = Table(title=f"pruning solver per decoder layer (Llama-3.1-8B shapes at scale 1/{scale}, {device.type})")
    columns = ("method", "pattern", "hessian s", "solve s", "total s", "baseline s", "speedup", "solve speedup")
    for column in (*columns, "error ratio"):
        table.add_column(column, justify="left" if column in ("method", "pattern") else "right")
    for row in rows:
        table.add_row(
            escape(row["method"]),
            row["pattern"],
            f"{row['hessian_s']:.2f}",
            f"{row['solve_s']:.2f}",
            f"{row['total_s']:.2f}",
            f"{row['baseline_total_s']:.2f}" if "baseline_total_s" in row else "-",
            f"{row['speedup']:.1f}x" if "speedup" in row else "-",
            f"{row['solve_speedup']:.1f}x" if "solve_speedup" in row else "-",
            f"{row['error_ratio']:.4f}" if "error_ratio" in row else "-",
        )
    Console(stderr=True, width=150).print(table)
    result = {"shape": shape.__dict__, "samples": samples, "seq_len": args.seq_len, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
