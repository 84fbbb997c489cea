"""srcr's per-tensor allocation (`--budget-mb`) against llama.cpp's presets at the presets' own bytes.

For each preset (Q4_K_M, Q3_K_M, IQ4_XS by default), all with srcr's importance matrix from the same
calibration windows: export the preset, then export `--budget-mb` at exactly the preset's file size,
and score both files in llama.cpp against the same reference pack. Prints each pair's mean KL, their
ratio and the paired 95% interval of the difference over the evaluation windows (same items, same draws).

    python bench/bench_budget.py                          # SmolLM2 (flattered: its weights are Q4_1 values)
    python bench/bench_budget.py --train 400              # a small Llama trained here first, never quantized
    python bench/bench_budget.py --model DIR [--presets Q4_K_M,IQ4_XS] [--json out.json]
    python bench/bench_budget.py --format onnx --model DIR  # per-layer MatMulNBits widths vs uniform ones
    python bench/bench_budget.py --quantizer auto         # also the budget with srcr's GPTQ per matrix (GGUF)
    python bench/bench_budget.py --cuts "ffn=0.01,allocation=global;layers=0.04"  # structured cut, then budget

With --cuts, each structured cut (sweep --structures syntax) is made first and the budget spent on what
is left, at each preset's bytes, paired against the uncut budget file of the same bytes: a cut pays only
when the bytes it frees buy back more than it loses.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from srcr.base.progress import no_progress  # noqa: E402
from srcr.evaluators.uncertainty import paired_difference  # noqa: E402
from srcr.exporter.manifest import item_scores  # noqa: E402

console = Console(stderr=True)
# Whole-model types to match in bytes: llama.cpp's presets; for ONNX, uniform MatMulNBits widths (srcr's wls).
DEFAULT_PRESETS = {
    "gguf": "Q4_K_M,Q3_K_M,IQ4_XS",
    "onnx": "MatMulNBits-q4-wls-b32,MatMulNBits-q4-wls-b64,MatMulNBits-q2-wls-b32",
}


def run(model: str | None, out: Path, presets: list[str], args: argparse.Namespace) -> list[dict]:
    """Every preset, then a budget at each preset's bytes: one load, one calibration pass and one reference
    pack for all (as a sweep shares them), and the sensitivities measured once (the same pruned model)."""
    from srcr.exporter import pipeline
    from srcr.exporter.recipe import Recipe

    recipe = Recipe().merged(
        {
            "model": {"source": model, "stream": "off"},
            "export": {"format": args.format},
            "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len},
            "evaluate": {"windows": args.windows, "text": str(args.eval_text) if args.eval_text else None},
        }
    )
    setting = pipeline.Setting(pipeline.prune_spec_for(0.0, None, recipe.prune), recipe.prune.structure.spec())
    cut_settings = [_cut_setting(pipeline, recipe, values) for values in args.cuts]
    plan = pipeline.make_plan(recipe, out, False, [], None, [setting, *cut_settings], quant_types=presets)
    setting, cut_settings = plan.settings[0], plan.settings[1:]
    _measure_once(pipeline)
    timer = pipeline.StageTimer()
    progress = no_progress
    loaded = pipeline.load_stage(plan, timer, progress)
    calibration = pipeline.calibration_stage(plan, loaded)
    pack = pipeline.reference_stage(plan, loaded, out, timer, progress)
    rows, uncut = [], {}
    with pipeline.prune_stage(plan, loaded, setting, calibration, out, timer, progress, reuse_dense=False) as pruned:

        def export(spec):
            name = pipeline.default_name(plan.source.label, setting, spec)
            paths = pipeline.OutputPaths.for_name(out, name, plan.target.suffix)
            stage_timer = pipeline.StageTimer()
            stage_timer.seconds = dict(timer.seconds)
            return pipeline.write_export(pruned, plan, spec, paths, pack, stage_timer, progress, recipe, True)

        for spec in plan.specs:
            console.print(f"[bold]{spec.quant_type}[/]")
            base = export(spec)
            budget = plan.target.resolve_quant(None, None, {"budget_mb": base.artifact.bytes / 1e6})
            ours = export(budget)
            rows.append(_row(spec.quant_type, base, ours))
            if args.quantizer == "auto":  # the same budget, srcr's GPTQ competing per matrix
                options = {"budget_mb": base.artifact.bytes / 1e6, "quantizer": "auto"}
                auto = export(plan.target.resolve_quant(None, None, options))
                rows.append({**_row(f"{spec.quant_type} --quantizer auto", base, auto), **_auto(auto, ours)})
            if args.budget_check:  # the same budget, its candidates measured on the whole model (same file name)
                options = {"budget_mb": base.artifact.bytes / 1e6, "budget_check": True}
                checked = export(plan.target.resolve_quant(None, None, options))
                rows.append({**_row(f"{spec.quant_type} --budget-check", base, checked), **_checked(checked, ours)})
            uncut[spec.quant_type] = (base, ours)
    for cut in cut_settings:
        with pipeline.prune_stage(plan, loaded, cut, calibration, out, timer, progress, reuse_dense=False) as pruned:
            for quant_type, (base, ours) in uncut.items():
                console.print(f"[bold]{quant_type} bytes, cut {_describe(cut.structure)}[/]")
                name = f"cut{cut_settings.index(cut)}-at-{quant_type}"
                paths = pipeline.OutputPaths.for_name(out, name, plan.target.suffix)
                spec = plan.target.resolve_quant(None, None, {"budget_mb": base.artifact.bytes / 1e6})
                cut_file = pipeline.write_export(pruned, plan, spec, paths, pack, pipeline.StageTimer(), progress,
                                                 recipe, True)  # fmt: skip
                rows.append({**_row(f"{quant_type} bytes, {_describe(cut.structure)}", base, cut_file),
                             **_cut(cut_file, ours, pruned)})  # fmt: skip
    return rows


def _cut_setting(pipeline, recipe, values: dict):
    from srcr.exporter.pruning.structured.spec import StructureSpec

    # Only budget files are written from a cut, and a GGUF budget rounds widths to 32 (the presets' 256
    # would make the smallest cut eight times coarser).
    values = {**values, "multiple": values["multiple"] or 32}
    return pipeline.Setting(pipeline.prune_spec_for(0.0, None, recipe.prune), StructureSpec(**values))


def _describe(structure) -> str:
    parts = []
    if structure.drop_layers:
        parts.append(f"{structure.depth_method} layers {structure.drop_layers:g}")
    if structure.ffn_ratio:
        parts.append(f"{structure.width_method} ffn {structure.ffn_ratio:g}")
    if structure.head_ratio:
        parts.append(f"{structure.width_method} heads {structure.head_ratio:g}")
    if structure.width and structure.allocation == "global":
        parts.append("global")
    return " ".join(parts)


def _cut(cut_file, uncut, pruned) -> dict:
    """What the cut removed, and its held-out KL against the uncut budget file of the same bytes (paired)."""
    report = pruned.structure
    difference = paired_difference(item_scores(cut_file), item_scores(uncut), "kld_mean")
    interval = difference.as_dict()
    removed = 1 - report.parameters_after / report.parameters_before
    return {
        "removed_parameters": removed,
        "chosen": f"cut {removed:.2%} of params; vs uncut [{interval['low']:+.4f}, {interval['high']:+.4f}]"
        f"{' *' if interval['significant'] else ''}",
        "uncut_kl": uncut.evaluation.kld.mean,
        "versus_uncut": interval,
        "notes": report.notes,
    }


def _measure_once(pipeline) -> None:
    """One pruned model: its sensitivities (one set per metric) and its Gram matrices measured once."""
    from srcr.exporter import hessians

    measure, measured = pipeline.sensitivity_stage, {}

    def sensitivity_once(pruned, plan, progress, grams=None):
        key = (id(pruned.loaded.model), grams is not None)
        if key not in measured:
            measured[key] = measure(pruned, plan, progress, grams)
        return measured[key]

    grams_of, grams = hessians.input_grams, []

    def grams_once(*args, **kwargs):
        if not grams:
            grams.append(grams_of(*args, **kwargs))
        return grams[0]

    pipeline.sensitivity_stage = sensitivity_once
    hessians.input_grams = grams_once


def _auto(auto, llama_cpp_only) -> dict:
    """How many matrices --quantizer auto gave srcr's GPTQ, and its held-out KL against the llama.cpp-only
    budget at the same bytes (paired)."""
    gptq_tensors = auto.quantization.model_dump().get("gptq_tensors") or 0
    difference = paired_difference(item_scores(auto), item_scores(llama_cpp_only), "kld_mean")
    interval = difference.as_dict()
    return {
        "gptq_tensors": gptq_tensors,
        "chosen": f"{gptq_tensors} GPTQ; vs llama.cpp-only [{interval['low']:+.4f}, {interval['high']:+.4f}]"
        f"{' *' if interval['significant'] else ''}",
        "llama_cpp_only_kl": llama_cpp_only.evaluation.kld.mean,
        "versus_llama_cpp_only": interval,
        "seconds": {stage: auto.timings_s.get(stage) for stage in ("statistics", "sensitivity", "allocate", "gptq")},
    }


def _checked(checked, additive) -> dict:
    """What --budget-check chose, and its held-out KL against the additive mix's (paired)."""
    allocation = checked.quantization.model_dump()["allocation"]
    difference = paired_difference(item_scores(checked), item_scores(additive), "kld_mean")
    return {
        "chosen": allocation["chosen"],
        "calibration_kl": {entry["candidate"]: entry["measured_kl"] for entry in allocation["checked"]},
        "versus_additive": difference.as_dict(),
    }


def _row(preset: str, base, ours) -> dict:
    difference = paired_difference(item_scores(ours), item_scores(base), "kld_mean")
    base_kl, our_kl = base.evaluation.kld.mean, ours.evaluation.kld.mean
    quantization = ours.quantization.model_dump()
    return {
        "preset": preset,
        "preset_bytes": base.artifact.bytes,
        "budget_bytes": ours.artifact.bytes,
        "preset_bpw": base.artifact.bits_per_weight,
        "budget_bpw": ours.artifact.bits_per_weight,
        "preset_kl": base_kl,
        "budget_kl": our_kl,
        "ratio": our_kl / base_kl,
        "difference": difference.as_dict(),
        "preset_ppl": base.evaluation.perplexity.compressed,
        "budget_ppl": ours.evaluation.perplexity.compressed,
        "predicted_kl": quantization["allocation"]["predicted_kl"],
        "types": dict(Counter(quantization["allocation"]["tensors"].values())),
        "preset_types": base.quantization.model_dump().get("type_mix"),
        "seconds": {stage: ours.timings_s.get(stage) for stage in ("sensitivity", "allocate")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2)")
    parser.add_argument("--train", type=int, default=0, help="train bench_gptq's small Llama this many steps")
    parser.add_argument("--layers", type=int, default=8, help="decoder layers of the trained Llama")
    parser.add_argument("--format", default="gguf", choices=("gguf", "onnx"))
    parser.add_argument("--presets", default=None, help=f"default: {DEFAULT_PRESETS['gguf']} (GGUF), "
                        f"{DEFAULT_PRESETS['onnx']} (ONNX)")  # fmt: skip
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--eval-text", type=Path, default=None, help="held-out text (default: lee.cor, 8 windows)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--budget-check", action="store_true", help="also each budget with --budget-check (its candidates measured)"
    )
    parser.add_argument(
        "--quantizer", default="llama.cpp", choices=("llama.cpp", "auto"),
        help="auto: also each budget with --quantizer auto (GGUF), against the llama.cpp-only budget",
    )  # fmt: skip
    parser.add_argument("--cuts", default="", help="structured cuts to spend the budget after, sweep --structures "
                        "syntax ('ffn=0.01,allocation=global;layers=0.04')")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    from srcr.exporter.cli import parse_structures

    args.cuts = [values for values in parse_structures(args.cuts) if len(values) > 1] if args.cuts else []
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-budget-"))
    model = args.model
    if args.train:
        from bench_gptq import train_small_llama

        folder = out / "trained-llama"
        if not (folder / "config.json").exists():
            train_small_llama(folder, args.train, layers=args.layers)
        model = str(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(model, out, (args.presets or DEFAULT_PRESETS[args.format]).split(","), args)
    table = Table(title=f"--budget-mb at each preset's bytes ({model or 'SmolLM2-135M'})")
    for column in ("preset", "bytes preset / ours", "bpw preset / ours", "mean KL preset", "mean KL ours", "ratio",
                   "paired 95% interval of ours - preset", "ppl preset / ours", "chosen"):  # fmt: skip
        table.add_column(column)
    for row in rows:
        interval = row["difference"]
        table.add_row(
            row["preset"],
            f"{row['preset_bytes']:,} / {row['budget_bytes']:,}",
            f"{row['preset_bpw']:.3f} / {row['budget_bpw']:.3f}",
            f"{row['preset_kl']:.4f}",
            f"{row['budget_kl']:.4f}",
            f"{row['ratio']:.3f}",
            f"[{interval['low']:+.4f}, {interval['high']:+.4f}]{' *' if interval['significant'] else ''}",
            f"{row['preset_ppl']:.2f} / {row['budget_ppl']:.2f}",
            row.get("chosen", ""),
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
