"""The `srcr` command line (typer + rich)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from srcr import __version__
from srcr.exporter.manifest import Manifest
from srcr.exporter.recipe import Recipe
from srcr.exporter.ui import stage_progress, stderr_console, stdout_console, user_errors

if TYPE_CHECKING:
    from srcr.exporter.sweep import SweepSummary

app = typer.Typer(
    name="srcr",
    help=(
        "Prune, quantize and export LLMs for edge runtimes (GGUF for llama.cpp, ONNX for ONNX Runtime), "
        "and measure how much of the dense model's meaning survives in the exported file itself (Sr, SrCr)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PATTERN_HELP = (
    "Semi-structured N:M sparsity: N of every M consecutive input weights are zeroed "
    "(2:4 = 50%, 2:8 = 25%, 4:8 = 50%). Replaces --sparsity."
)
METHOD_HELP = (
    "Pruning method: sparsegpt (second-order, with error compensation; the default), "
    "wanda (|w| × input norm) or magnitude (|w| alone)."
)
QUANTIZER_HELP = (
    "Who rounds the decoder's weight matrices: the format's own quantizer (default: llama.cpp for GGUF, "
    "ONNX Runtime for ONNX) or gptq: srcr's GPTQ onto the format's exact grid, in the same calibration sweep "
    "as pruning (joint SparseGPT + GPTQ when pruning), written into the file without re-quantizing "
    "(GGUF Q2_K, Q3_K, Q4_0, Q5_0, Q6_K, Q8_0: --bits 2, 3, 4, 5, 6, 8; Q4_1, Q5_1, Q4_K, Q5_K by "
    "--quant-type; the K types on rows of a multiple of 256; ONNX MatMulNBits 2-, 4- or 8-bit blocks of 32, "
    "with zero points or --symmetric). With --budget-mb/--budget-bpw (GGUF): auto lets each decoder matrix "
    "be rounded by llama.cpp or srcr's GPTQ, whichever is predicted to lose less (unpruned models; slower)."
)
STREAM_HELP = (
    "Read the decoder layers from the checkpoint one at a time (auto: unless the whole model and one layer's "
    "pruning work fit in 1 GiB and half the free memory; on; off). Streamed, host memory holds one layer, the "
    "embedding and the activations (GGUF only)."
)
REFERENCE_HELP = (
    "Where the dense reference is computed: torch (the model in memory), artifact (its unrounded GGUF in "
    "llama.cpp, for a model that does not fit), or auto (artifact when streaming)."
)
DEVICE_HELP = (
    "Where PyTorch runs the dense reference and pruning: auto (CUDA when available), cpu or cuda. "
    "The artifact itself is measured in its own runtime, on its accelerator when it has one."
)
PERCDAMP_HELP = "SparseGPT: Hessian dampening as a fraction of its mean diagonal; raise it if a layer fails."
PRUNE_BLOCK_HELP = "SparseGPT: columns per lazy-update block (a multiple of M for N:M patterns)."
ENCODING_HELP = "Encoding of {what} (default: UTF-8; the built-in Lee corpora are read as latin-1)."
DROP_HELP = "Structured: fraction of decoder layers to remove (whole layers; 0.2 of 30 removes 6)."
DEPTH_HELP = "Which layers go: bi (ShortGPT block influence, one pass) or sleb (greedy by calibration perplexity)."
FFN_HELP = "Structured: fraction of FFN channels to remove (gate/up rows with their down_proj columns)."
HEAD_HELP = "Structured: fraction of KV groups to remove, each with its query heads (keeps GQA valid)."
WIDTH_METHOD_HELP = "Width scores: flap (fluctuation, with bias compensation) or wanda-sp (|W|·‖x‖)."
ALLOCATION_HELP = "uniform: every layer keeps the same widths; global: layers ranked together (per-layer widths)."
MULTIPLE_HELP = "Kept FFN widths are multiples of this; 0 (default): the quantization's block (256 for K-quants)."


def _version(value: bool) -> None:
    if value:
        typer.echo(f"srcr {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """srcr: compress a causal LM and measure semantic retention on the deployed artifact."""


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def summary_table(typed: Manifest) -> Table:
    """The end-of-export summary: what was produced and what it keeps."""
    manifest = typed.as_dict()
    table = Table(title=f"srcr export: {manifest['name']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    artifact, pruning, compression = manifest["artifact"], manifest["pruning"], manifest["compression"]
    quant = manifest["quantization"]
    rows = [
        (
            "artifact",
            f"{artifact['file']} ({artifact['bytes'] / 1e6:.1f} MB, {artifact['bits_per_weight']:.2f} bits/w)",
        ),
        ("source", f"{manifest['source_model']['id']} ({manifest['source_model']['parameters'] / 1e6:.0f}M params)"),
        (
            "pruning",
            f"{pruning['method'] or 'none'} {pruning['pattern'] or _fmt(pruning['sparsity'], '.0%')}, "
            f"achieved {pruning['achieved_sparsity']:.2%} of pruned linears",
        ),
        ("structure", _structure_summary(pruning.get("structure"))),
        ("quantization", f"{quant['type']} ({quant['bits']}-bit)"),
        ("type mix", ", ".join(f"{k}: {v}" for k, v in (quant.get("type_mix") or {}).items()) or "-"),
        ("TCr", f"{compression['tcr']:.4f}"),
        (
            "actual compression",
            f"{compression['actual']:.4f} (vs the 16-bit model, {compression['baseline_bytes'] / 1e6:.1f} MB)",
        ),
    ]
    evaluation = manifest.get("evaluation")
    if evaluation:
        ppl, kld = evaluation["perplexity"], evaluation["kld"]
        rows += [
            ("perplexity", f"{ppl['compressed']:.2f} (base {ppl['base']:.2f})"),
            (
                "KL divergence",
                f"mean {kld['mean']:.4f}, median {kld['median']:.4f}, p90 {kld['p90']:.4f}, "
                f"p99 {kld['p99']:.4f}, max {kld['max']:.4f}",
            ),
            ("same top token", f"{evaluation['top1_agreement']:.2%}"),
            ("semantic similarity", f"{evaluation['semantic']['mean']:.4f}"),
            (
                "last-word accuracy",
                f"{evaluation['last_word']['acc']:.2%} (base {evaluation['last_word']['base_acc']:.2%})",
            ),
        ]
        if evaluation.get("multiple_choice"):
            mc = evaluation["multiple_choice"]
            rows.append(("multiple choice acc", f"{mc['acc']:.2%} (base {mc['base_acc']:.2%})"))
        retention = ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in evaluation["retention"].items())
        rows += [
            ("retention", retention),
            ("Sr", f"{manifest['sr']:.4f}"),
            ("SrCr (Sr×TCr)", f"{manifest['srcr']:.4f}"),
            ("Sr × actual", f"{manifest['sr_actual']:.4f}"),
        ]
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in manifest["timings_s"].items())
    rows.append(("wall time", timings))
    for key, value in rows:
        table.add_row(key, value)
    return table


def _structure_summary(structure: dict[str, Any] | None) -> str:
    if not structure:
        return "none"
    widths = structure["widths"]
    ffn = sorted({row["ffn"] for row in widths})
    heads = sorted({row["heads"] for row in widths})
    parts = [f"removed {structure['removed_fraction']:.1%} of the parameters"]
    if structure["removed_layers"]:
        parts.append(f"layers {len(widths) + len(structure['removed_layers'])}→{len(widths)}")
    if structure["ffn_ratio"]:
        parts.append(f"FFN {structure['ffn_before']}→{'/'.join(map(str, ffn))}")
    if structure["head_ratio"]:
        parts.append(f"heads {structure['heads_before']}→{'/'.join(map(str, heads))}")
    return ", ".join(parts)


# Help panels: the options of export and sweep grouped by stage, as the recipe is.
P_RECIPE, P_MODEL, P_PRUNE, P_STRUCT = "Recipe", "Model", "Pruning", "Structured pruning"
P_QUANT, P_CALIB, P_EVAL, P_OUT = "Quantization", "Calibration", "Evaluation", "Output"
P_RUN = "Where it runs"
DEFAULT = Recipe()
RECIPE_HELP = (
    "Start from a recipe (TOML, YAML or JSON; docs/recipe.md) or a manifest, whose embedded recipe reproduces "
    "its artifact bit for bit on the same kind of machine; flags given beside it override its fields."
)
BUDGET_MB_HELP = (
    "Make the file at most this many MB (10^6 bytes): srcr measures each weight matrix's sensitivity on the "
    "calibration data and picks its storage for the least predicted KL: a llama.cpp type per matrix (GGUF: K, IQ "
    "and legacy types), or MatMulNBits bits and block size per layer (ONNX); replaces --bits / --quant-type. "
    "The choice is in the manifest (quantization.allocation)."
)
BUDGET_BPW_HELP = "As --budget-mb, for this many bits per weight on average over the weight matrices."
BUDGET_CHECK_HELP = (
    "With a budget: also measure the chosen mix and its alternatives (the largest tensor at each of its options, "
    "the best uniform one) on the whole model over the calibration tokens, and keep the best; the tensors' "
    "losses do not add. Takes a forward pass per candidate; only as good as the calibration text is unlike "
    "the model's training text (docs/results.md)."
)
PRINT_RECIPE_HELP = "Print the recipe the flags (and --recipe) describe, as TOML, and exit without running it."


def _print_replay_notes(console: Any, recipe_file: Path | None) -> None:
    from srcr.exporter.api import replay_notes

    for note in replay_notes(recipe_file) if recipe_file is not None else []:
        console.print(f"[yellow]note:[/] {escape(note)}; the artifact may differ in its bytes", highlight=False)


@app.command()
def export(
    ctx: typer.Context,
    recipe_file: Annotated[
        Path | None, typer.Option("--recipe", help=RECIPE_HELP, rich_help_panel=P_RECIPE, show_default=False)
    ] = None,
    print_recipe: Annotated[bool, typer.Option(help=PRINT_RECIPE_HELP, rich_help_panel=P_RECIPE)] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Local Hugging Face folder or hub id. Default: the embedded SmolLM2-135M-Instruct.",
            rich_help_panel=P_MODEL,
        ),
    ] = DEFAULT.model.source,
    stream: Annotated[str, typer.Option(help=STREAM_HELP, rich_help_panel=P_MODEL)] = DEFAULT.model.stream,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=P_MODEL)] = DEFAULT.model.device,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow pickled .bin weights (they can run code: only for sources you trust). Never taken from "
            "a recipe.",
            rich_help_panel=P_MODEL,
        ),
    ] = False,
    sparsity: Annotated[
        float,
        typer.Option(
            help="Unstructured sparsity: fraction of each pruned linear's weights zeroed, in [0, 1).",
            rich_help_panel=P_PRUNE,
        ),
    ] = DEFAULT.prune.sparsity,
    pattern: Annotated[str | None, typer.Option(help=PATTERN_HELP, rich_help_panel=P_PRUNE)] = DEFAULT.prune.pattern,
    method: Annotated[str, typer.Option(help=METHOD_HELP, rich_help_panel=P_PRUNE)] = DEFAULT.prune.method,
    percdamp: Annotated[float, typer.Option(help=PERCDAMP_HELP, rich_help_panel=P_PRUNE)] = DEFAULT.prune.percdamp,
    prune_block_size: Annotated[
        int, typer.Option(help=PRUNE_BLOCK_HELP, rich_help_panel=P_PRUNE)
    ] = DEFAULT.prune.block_size,
    drop_layers: Annotated[
        float, typer.Option(help=DROP_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.drop_layers,
    depth_method: Annotated[
        str, typer.Option(help=DEPTH_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.depth_method,
    ffn_ratio: Annotated[
        float, typer.Option(help=FFN_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.ffn_ratio,
    head_ratio: Annotated[
        float, typer.Option(help=HEAD_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.head_ratio,
    width_method: Annotated[
        str, typer.Option(help=WIDTH_METHOD_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.width_method,
    width_allocation: Annotated[
        str, typer.Option(help=ALLOCATION_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.allocation,
    width_multiple: Annotated[
        int, typer.Option(help=MULTIPLE_HELP, rich_help_panel=P_STRUCT)
    ] = DEFAULT.prune.structure.multiple,
    bits: Annotated[
        int | None,
        typer.Option(
            help="Quantization bit-width (GGUF: 2,3,4,5,6,8,16; ONNX: 2,4,8,16,32). Default 4.",
            rich_help_panel=P_QUANT,
        ),
    ] = DEFAULT.quantize.bits,
    quant_type: Annotated[
        str | None,
        typer.Option(
            help="Name the format's quantization type directly, e.g. Q4_K_M or IQ2_XXS.", rich_help_panel=P_QUANT
        ),
    ] = DEFAULT.quantize.type,
    quantizer: Annotated[
        str | None, typer.Option(help=QUANTIZER_HELP, rich_help_panel=P_QUANT)
    ] = DEFAULT.quantize.quantizer,
    quant_block_size: Annotated[
        int | None,
        typer.Option(
            help="ONNX: weights per quantization block (default 32; formerly --block-size).", rich_help_panel=P_QUANT
        ),
    ] = DEFAULT.quantize.block_size,
    quant_algo: Annotated[
        str | None,
        typer.Option(help="ONNX: weight quantization algorithm: wls (default), hqq or rtn.", rich_help_panel=P_QUANT),
    ] = DEFAULT.quantize.algo,
    quant_scheme: Annotated[
        str | None,
        typer.Option(
            help="ONNX: weight-only (default) or dynamic (int8 weights and activations).", rich_help_panel=P_QUANT
        ),
    ] = DEFAULT.quantize.scheme,
    symmetric: Annotated[
        bool | None,
        typer.Option("--symmetric/--asymmetric", help="ONNX: symmetric or asymmetric blocks.", rich_help_panel=P_QUANT),
    ] = DEFAULT.quantize.symmetric,
    budget_mb: Annotated[
        float | None, typer.Option(help=BUDGET_MB_HELP, rich_help_panel=P_QUANT, show_default=False)
    ] = DEFAULT.quantize.budget_mb,
    budget_bpw: Annotated[
        float | None, typer.Option(help=BUDGET_BPW_HELP, rich_help_panel=P_QUANT, show_default=False)
    ] = DEFAULT.quantize.budget_bpw,
    budget_check: Annotated[
        bool | None,
        typer.Option("--budget-check/--no-budget-check", help=BUDGET_CHECK_HELP, rich_help_panel=P_QUANT),
    ] = DEFAULT.quantize.budget_check,
    calib: Annotated[
        Path | None,
        typer.Option(
            help="Calibration text: plain text or JSONL with a `text` field. Default: gensim's Lee corpus.",
            rich_help_panel=P_CALIB,
        ),
    ] = None,
    calib_encoding: Annotated[
        str | None, typer.Option(help=ENCODING_HELP.format(what="--calib"), rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.encoding,
    calib_samples: Annotated[
        int | None,
        typer.Option(help="Calibration samples (default 128, capped by the corpus).", rich_help_panel=P_CALIB),
    ] = DEFAULT.calibration.samples,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration sample (default 2048).", rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.seq_len,
    seed: Annotated[
        int, typer.Option(help="Seed for choosing calibration windows.", rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.seed,
    evaluate: Annotated[
        bool,
        typer.Option(
            "--eval/--no-eval", help="Measure the exported artifact against the dense model.", rich_help_panel=P_EVAL
        ),
    ] = DEFAULT.evaluate.enabled,
    reference: Annotated[str, typer.Option(help=REFERENCE_HELP, rich_help_panel=P_EVAL)] = DEFAULT.evaluate.reference,
    eval_text: Annotated[
        Path | None,
        typer.Option(help="Held-out evaluation text (default: gensim's lee.cor).", rich_help_panel=P_EVAL),
    ] = None,
    eval_encoding: Annotated[
        str | None, typer.Option(help=ENCODING_HELP.format(what="--eval-text"), rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.encoding,
    prompts: Annotated[
        Path | None, typer.Option(help="Extra prompts (JSONL) for semantic similarity.", rich_help_panel=P_EVAL)
    ] = None,
    tasks: Annotated[
        Path | None,
        typer.Option(help='Multiple-choice tasks (JSONL: {"context", "choices", "answer"}).', rich_help_panel=P_EVAL),
    ] = None,
    eval_windows: Annotated[
        int | None,
        typer.Option(help="Number of evaluation windows (default 8 × 512 tokens).", rich_help_panel=P_EVAL),
    ] = DEFAULT.evaluate.windows,
    last_word_items: Annotated[
        int | None,
        typer.Option(
            help="Last-word accuracy items taken from the evaluation text (default 100; 0 skips).",
            rich_help_panel=P_EVAL,
        ),
    ] = DEFAULT.evaluate.last_word_items,
    new_tokens: Annotated[
        int | None,
        typer.Option(
            help="Greedy tokens generated per prompt for semantic similarity (default 32).", rich_help_panel=P_EVAL
        ),
    ] = DEFAULT.evaluate.new_tokens,
    builtin_prompts: Annotated[
        bool,
        typer.Option(
            help="Include the 52 built-in prompts (--no-builtin-prompts: only --prompts FILE).",
            rich_help_panel=P_EVAL,
        ),
    ] = DEFAULT.evaluate.builtin_prompts,
    top_k: Annotated[
        int | None,
        typer.Option(
            help="Reference pack: top-k log-probabilities kept per position (default 128).", rich_help_panel=P_EVAL
        ),
    ] = DEFAULT.evaluate.top_k,
    lm_eval_tasks: Annotated[str | None, typer.Option(help=LM_EVAL_TASKS_HELP, rich_help_panel=P_EVAL)] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(help=LM_EVAL_INCLUDE_HELP, rich_help_panel=P_EVAL)] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help=LM_EVAL_LIMIT_HELP, rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.lm_eval_limit,
    out: Annotated[Path, typer.Option(help="Output folder.", rich_help_panel=P_OUT)] = Path("out"),
    name: Annotated[
        str | None,
        typer.Option(
            help="Base file name of the outputs, without a folder (default: from the settings).",
            rich_help_panel=P_OUT,
        ),
    ] = DEFAULT.export.name,
    fmt: Annotated[
        str, typer.Option("--format", help="Deployment format: gguf or onnx.", rich_help_panel=P_OUT)
    ] = DEFAULT.export.format,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.", rich_help_panel=P_OUT)] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the manifest as JSON instead of the table.", rich_help_panel=P_OUT)
    ] = False,
) -> None:
    """Prune, quantize and export a model; evaluate the artifact and write its manifest.

    Every option is a field of a recipe (docs/recipe.md). --print-recipe shows the recipe the flags describe,
    --recipe FILE runs one, and --recipe OUT/NAME.manifest.json reproduces that artifact.
    """
    from srcr.exporter import api
    from srcr.exporter.flags import EXPORT_FLAGS, base_recipe, recipe_from_flags

    console = stderr_console()
    with user_errors(console) as interrupts:
        recipe = recipe_from_flags(ctx, EXPORT_FLAGS, base_recipe(recipe_file), {"lm_eval_tasks": _task_names})
        if print_recipe:
            typer.echo(recipe.to_toml(), nl=False)
            return
        _print_replay_notes(console, recipe_file)
        with stage_progress(console, interrupts) as progress:
            manifest = api.export(
                recipe=recipe, out=out, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress
            )
    if as_json:
        typer.echo(manifest.to_json(), nl=False)
    else:
        stdout_console().print(summary_table(manifest))


def _parse_tolerances(items: list[str]) -> dict[str, float]:
    from srcr.base.errors import SrcrError

    tolerances = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            tolerances[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise SrcrError(f"--tolerance {item!r} is not NAME=VALUE; e.g. --tolerance sr=0.02")
    return tolerances


LM_EVAL_TASKS_HELP = (
    "lm-evaluation-harness tasks run on the artifact and on the dense model, comma-separated (e.g. "
    "arc_easy,hellaswag); each adds its accuracy and retention to the manifest and to Sr. Needs "
    "pip install 'srcr[lm-eval]' and the tasks' datasets (downloaded by lm-eval, or local task files)."
)
LM_EVAL_INCLUDE_HELP = "A folder of your own lm-eval task files (YAML; local JSON/JSONL data works offline)."
LM_EVAL_LIMIT_HELP = "Items per lm-eval task (default: all); a quick look, with wider intervals."


def _task_names(text: str | None) -> list[str] | None:
    names = [name.strip() for name in (text or "").split(",") if name.strip()]
    return names or None


@app.command()
def verify(
    manifest: Annotated[Path, typer.Argument(help="The <name>.manifest.json written by srcr export.")],
    tolerance: Annotated[
        list[str] | None,
        typer.Option(help="Override a tolerance, NAME=VALUE (repeatable); see docs/verify.md for names."),
    ] = None,
    device: Annotated[str, typer.Option(help="Runtime device: auto, cpu or cuda.")] = "auto",
    tolerance_mode: Annotated[
        str,
        typer.Option(
            help="drift: |measured - recorded| within the tolerance (same items, so only runtime drift counts); "
            "interval: measured inside the manifest's 95% interval widened by the tolerance. See docs/verify.md."
        ),
    ] = "drift",
    as_json: Annotated[bool, typer.Option("--json", help="Print the checks as JSON.")] = False,
) -> None:
    """Re-measure an exported artifact on this device and compare with its manifest (exit 1 on drift)."""
    from srcr.exporter import api

    console = stderr_console()
    with user_errors(console) as interrupts:
        limits = _parse_tolerances(tolerance or [])
        with stage_progress(console, interrupts) as progress:
            outcome = api.verify(manifest, tolerances=limits, device=device, mode=tolerance_mode, progress=progress)
    speed = outcome.measured.get("speed", {})
    if as_json:
        payload = {
            "passed": outcome.passed,
            "tolerance_mode": tolerance_mode,
            "checks": [check.__dict__ for check in outcome.checks],
            "speed": speed,
            "peak_rss_mb": outcome.peak_rss_mb,
            "runtime": outcome.measured.get("runtime"),
        }
        typer.echo(json.dumps(payload, indent=2, default=str))
    else:
        table = Table(title=f"srcr verify: {outcome.manifest.name}", title_justify="left")
        limit_header = "accepted range" if tolerance_mode == "interval" else "tolerance"
        for header in ("figure", "manifest", "measured", "drift", limit_header, ""):
            table.add_column(header, justify="right" if header not in ("figure", "") else "left")
        for check in outcome.checks:
            status = "[green]ok[/]" if check.ok else "[bold red]DRIFT[/]"
            limit = (
                f"{check.accepted[0]:.4f}–{check.accepted[1]:.4f}"
                if check.accepted is not None
                else _fmt(check.tolerance, ".4f")
            )
            table.add_row(
                check.name,
                _fmt(check.expected, ".4f"),
                _fmt(check.measured, ".4f"),
                _fmt(check.drift, "+.4f"),
                limit,
                status,
            )
        out = stdout_console()
        out.print(table)
        out.print(
            f"device: prompt {speed.get('prompt_tokens_per_s', 0):.1f} tok/s, "
            f"generation {speed.get('generation_tokens_per_s', 0):.1f} tok/s, "
            f"peak memory {outcome.peak_rss_mb:.0f} MB, runtime {outcome.measured.get('runtime')}"
        )
        verdict = "[bold green]PASS[/]" if outcome.passed else "[bold red]FAIL[/]: figures drifted beyond tolerance"
        out.print(verdict)
    raise typer.Exit(0 if outcome.passed else 1)


@app.command()
def compare(
    manifests: Annotated[list[Path], typer.Argument(help="Manifests to compare (the base model row comes first).")],
    sort: Annotated[str | None, typer.Option(help="Sort by a column key, best first (e.g. srcr, sr, kld, mb).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print rows as JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print rows as CSV.")] = False,
) -> None:
    """Compare exported artifacts side by side: size, compression, fidelity, Sr and SrCr."""
    from srcr.exporter.compare import read_unique, render_table, rows_for, to_csv

    console = stderr_console()
    with user_errors(console):
        typed, notes = read_unique(manifests)
        rows = rows_for(typed, sort)
    for note in notes:
        console.print(f"[yellow]note:[/] {escape(note)}", highlight=False, soft_wrap=True)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif as_csv:
        typer.echo(to_csv(rows), nl=False)
    else:
        stdout_console().print(render_table(rows))


def _split(text: str, cast: type, option: str) -> list[Any]:
    from srcr.base.errors import SrcrError

    try:
        return [cast(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SrcrError(f"--{option} {text!r} is not a comma-separated list; e.g. --{option} 0,0.25,0.5") from None


STRUCTURE_KEYS = {
    "layers": ("drop_layers", float),
    "depth": ("depth_method", str),
    "ffn": ("ffn_ratio", float),
    "heads": ("head_ratio", float),
    "width": ("width_method", str),
    "allocation": ("allocation", str),
    "multiple": ("multiple", int),
}


def parse_structures(text: str) -> list[dict[str, Any]]:
    """`none;ffn=0.25;layers=0.2,depth=sleb` -> the recipe's sweep.structures (multiple 0: the target's block
    width)."""
    from srcr.base.errors import SrcrError

    specs = []
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        values: dict[str, Any] = {"multiple": 0}
        if item != "none":
            for pair in item.split(","):
                key, sep, value = pair.partition("=")
                key = key.strip()
                if not sep or key not in STRUCTURE_KEYS:
                    raise SrcrError(
                        f"--structures item {item!r} is not key=value pairs of {', '.join(STRUCTURE_KEYS)}; "
                        "e.g. --structures 'none;ffn=0.25,heads=0.33'"
                    )
                field_name, cast = STRUCTURE_KEYS[key]
                try:
                    values[field_name] = cast(value.strip())
                except ValueError:
                    raise SrcrError(f"--structures {key}={value!r} is not a {cast.__name__}") from None
        specs.append(values)
    if not specs:
        raise SrcrError("--structures is empty; pass 'none' for no structured pruning")
    return specs


def common_name_prefix(names: list[str]) -> str:
    """The shared leading part of the configurations' names, cut at a '-' (the model's slug)."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind("-") + 1]


def _allocating_axes(ctx: typer.Context, recipe: Any) -> Any:
    """--allocate-mb stands in for the bit-width axes: the defaults go, ones the user named stay (and are refused)."""
    from srcr.exporter.flags import given_flags

    given = given_flags(ctx, {"allocate_mb": (), "bits": (), "quant_type": ()})
    if "allocate_mb" not in given:
        return recipe
    cleared = {axis: [] for axis in ("bits", "quant_type") if axis not in given}
    return recipe.merged({"sweep": cleared}) if cleared else recipe


def sweep_tables(summary: SweepSummary) -> list[Table]:
    from srcr.exporter.sweep_report import difference_text, interval_text

    prefix = common_name_prefix([record["name"] for record in summary.records])
    title = (
        "srcr sweep (sorted by SrCr; ◆ Pareto front by TCr, ◇ by bytes, ▲ by prompt tokens/s; retention per evaluator)"
    )
    # No vertical rules: twelve columns then fit a 120-column terminal.
    table = Table(
        title=f"{prefix}* {title}" if prefix else title,
        title_justify="left",
        box=box.SIMPLE_HEAVY,
        collapse_padding=True,
        pad_edge=False,
    )
    headers = ("configuration", "quant", "MB", "TCr", "actual", "KLD", "ppl", "semantic", "last-word")
    shortened = [record["name"].removeprefix(prefix) for record in summary.records]
    for header in (*headers, "Sr", "Sr 95%", "SrCr", "front"):
        justify = "left" if header in ("configuration", "quant") else "right"
        # Names are how files are found: narrow terminals squeeze the figures, never the names.
        min_width = max(map(len, shortened), default=0) if header == "configuration" else None
        table.add_column(header, justify=justify, min_width=min_width)
    for record in sorted(summary.records, key=lambda r: -(r["srcr"] or 0)):
        marks = (
            ("◆" if record["name"] in summary.front_tcr else "")
            + ("◇" if record["name"] in summary.front_bytes else "")
            + ("▲" if record["name"] in summary.front_speed else "")
        )
        style = "bold green" if record["name"] == summary.recommended["name"] else None
        retention = record["retention"]
        table.add_row(
            record["name"].removeprefix(prefix),
            record["quant"],
            f"{record['bytes'] / 1e6:.1f}",
            f"{record['tcr']:.4f}",
            f"{record['actual']:.3f}",
            _fmt(record["kld"], ".3g"),
            *(_fmt(retention.get(name), ".3f") for name in ("perplexity", "semantic", "last_word")),
            _fmt(record["sr"], ".4f"),
            interval_text(record.get("sr_interval")),
            _fmt(record["srcr"], ".4f"),
            marks,
            style=style,
        )
    equal = Table(title="joint vs quantization-only at equal TCr", title_justify="left")
    headers = ("TCr", "quantization only", "Sr", "pruning + quantization", "Sr", "joint vs quant-only", "ΔSr 95%")
    for header in headers:
        equal.add_column(header)
    for row in summary.equal_tcr:
        equal.add_row(
            f"{row['tcr']:.4f}",
            row["quant_only"].removeprefix(prefix),
            f"{row['quant_only_sr']:.4f}",
            row["joint"].removeprefix(prefix),
            f"{row['joint_sr']:.4f}",
            _fmt(row["relative_difference"], "+.2%"),
            difference_text(row["difference"]),
        )
    return [table, equal]


SWEEP_DEFAULT = DEFAULT.merged({"sweep": {}}).sweep


def _axis(values: list[Any]) -> str:
    return ",".join(f"{value:g}" if isinstance(value, float) else str(value) for value in values)


@app.command()
def sweep(
    ctx: typer.Context,
    recipe_file: Annotated[
        Path | None,
        typer.Option(
            "--recipe",
            help="Start from a recipe, its [sweep] table holding the axes (docs/recipe.md); flags override.",
            rich_help_panel=P_RECIPE,
            show_default=False,
        ),
    ] = None,
    print_recipe: Annotated[bool, typer.Option(help=PRINT_RECIPE_HELP, rich_help_panel=P_RECIPE)] = False,
    sparsity: Annotated[
        str, typer.Option(help="Unstructured sparsities to try, comma-separated.", rich_help_panel=P_PRUNE)
    ] = _axis(SWEEP_DEFAULT.sparsity),
    pattern: Annotated[
        str, typer.Option(help="N:M patterns to try, comma-separated (e.g. 2:8,2:4).", rich_help_panel=P_PRUNE)
    ] = _axis(SWEEP_DEFAULT.pattern),
    method: Annotated[str, typer.Option(help=METHOD_HELP, rich_help_panel=P_PRUNE)] = DEFAULT.prune.method,
    percdamp: Annotated[float, typer.Option(help=PERCDAMP_HELP, rich_help_panel=P_PRUNE)] = DEFAULT.prune.percdamp,
    prune_block_size: Annotated[
        int, typer.Option(help=PRUNE_BLOCK_HELP, rich_help_panel=P_PRUNE)
    ] = DEFAULT.prune.block_size,
    structures: Annotated[
        str,
        typer.Option(
            help="Structured settings to cross with the others, ';'-separated: none, or key=value pairs "
            "(layers, depth, ffn, heads, width, allocation), e.g. 'none;ffn=0.25;layers=0.2,depth=sleb'.",
            rich_help_panel=P_STRUCT,
        ),
    ] = "none",
    bits: Annotated[
        str,
        typer.Option(
            help="Bit-widths to try, comma-separated ('' for none: only --quant-type).", rich_help_panel=P_QUANT
        ),
    ] = _axis(SWEEP_DEFAULT.bits),
    quant_type: Annotated[
        str,
        typer.Option(
            help="The format's type names to try beside --bits, comma-separated (e.g. Q4_0,Q5_0).",
            rich_help_panel=P_QUANT,
        ),
    ] = _axis(SWEEP_DEFAULT.quant_type),
    quantizer: Annotated[
        str,
        typer.Option(
            help="Quantizers to try, comma-separated (e.g. llama.cpp,gptq; default: the format's own). "
            "gptq is srcr's GPTQ on the format's exact grid, see srcr export --help.",
            rich_help_panel=P_QUANT,
        ),
    ] = _axis(SWEEP_DEFAULT.quantizer),
    model: Annotated[
        str | None,
        typer.Option(help="Local Hugging Face folder or hub id (default: SmolLM2).", rich_help_panel=P_MODEL),
    ] = DEFAULT.model.source,
    stream: Annotated[str, typer.Option(help=STREAM_HELP, rich_help_panel=P_MODEL)] = DEFAULT.model.stream,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=P_MODEL)] = DEFAULT.model.device,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            help="Allow pickled .bin weights (trusted sources only; never from a recipe).", rich_help_panel=P_MODEL
        ),
    ] = False,
    calib: Annotated[
        Path | None, typer.Option(help="Calibration text (default: gensim's Lee corpus).", rich_help_panel=P_CALIB)
    ] = None,
    calib_encoding: Annotated[
        str | None, typer.Option(help=ENCODING_HELP.format(what="--calib"), rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.encoding,
    calib_samples: Annotated[
        int | None, typer.Option(help="Calibration samples (default 128, capped).", rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.samples,
    seq_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration sample (default 2048).", rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.seq_len,
    seed: Annotated[
        int, typer.Option(help="Seed for choosing calibration windows.", rich_help_panel=P_CALIB)
    ] = DEFAULT.calibration.seed,
    reference: Annotated[str, typer.Option(help=REFERENCE_HELP, rich_help_panel=P_EVAL)] = DEFAULT.evaluate.reference,
    eval_text: Annotated[
        Path | None, typer.Option(help="Held-out evaluation text (default: lee.cor).", rich_help_panel=P_EVAL)
    ] = None,
    eval_encoding: Annotated[
        str | None, typer.Option(help=ENCODING_HELP.format(what="--eval-text"), rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.encoding,
    prompts: Annotated[
        Path | None, typer.Option(help="Extra prompts (JSONL) for semantic similarity.", rich_help_panel=P_EVAL)
    ] = None,
    tasks: Annotated[Path | None, typer.Option(help="Multiple-choice tasks (JSONL).", rich_help_panel=P_EVAL)] = None,
    eval_windows: Annotated[
        int | None, typer.Option(help="Number of evaluation windows.", rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.windows,
    last_word_items: Annotated[
        int | None, typer.Option(help="Last-word accuracy items (default 100).", rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.last_word_items,
    new_tokens: Annotated[
        int | None, typer.Option(help="Greedy tokens per prompt (default 32).", rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.new_tokens,
    builtin_prompts: Annotated[
        bool, typer.Option(help="Include the built-in prompts.", rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.builtin_prompts,
    lm_eval_tasks: Annotated[str | None, typer.Option(help=LM_EVAL_TASKS_HELP, rich_help_panel=P_EVAL)] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(help=LM_EVAL_INCLUDE_HELP, rich_help_panel=P_EVAL)] = None,
    lm_eval_limit: Annotated[
        int | None, typer.Option(help=LM_EVAL_LIMIT_HELP, rich_help_panel=P_EVAL)
    ] = DEFAULT.evaluate.lm_eval_limit,
    budget_mb: Annotated[
        float | None,
        typer.Option(help="Recommend the highest Sr whose file fits this many MB.", rich_help_panel=P_OUT),
    ] = SWEEP_DEFAULT.budget_mb,
    min_retention: Annotated[
        float | None,
        typer.Option(help="Recommend the most compression with Sr at least this.", rich_help_panel=P_OUT),
    ] = SWEEP_DEFAULT.min_retention,
    allocate_mb: Annotated[
        float | None,
        typer.Option(
            help="Make every configuration's file this many MB, its types chosen per tensor as srcr export "
            "--budget-mb chooses them, so that pruning settings (structured cuts above all) compete at equal "
            "bytes. Replaces --bits and --quant-type; the recommendation is the best Sr among them.",
            rich_help_panel=P_QUANT,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Sweep folder; rerunning with the same folder resumes.", rich_help_panel=P_OUT)
    ] = Path("sweep"),
    fmt: Annotated[
        str, typer.Option("--format", help="Deployment format: gguf or onnx.", rich_help_panel=P_OUT)
    ] = DEFAULT.export.format,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the records and recommendation as JSON.", rich_help_panel=P_OUT)
    ] = False,
    executor: Annotated[
        str,
        typer.Option(
            help="local: one pruning setting after another in this process; ray: each setting a Ray task "
            "(pip install 'srcr[ray]'), on this machine or the cluster at --ray-address.",
            rich_help_panel=P_RUN,
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="The Ray cluster to run on: auto (the one this machine belongs to) or HOST:PORT; default: "
            "a cluster of this machine's cores, started for the sweep. Several machines need a shared --out.",
            rich_help_panel=P_RUN,
        ),
    ] = None,
    cache: Annotated[
        bool,
        typer.Option(
            "--cache/--no-cache",
            help="Reuse finished stages (reference pack, pruning passes, configurations) from the stage cache "
            "and add to it.",
            rich_help_panel=P_RUN,
        ),
    ] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="The stage cache's folder (default: $SRCR_STAGE_CACHE, else ~/.cache/srcr/stages).",
            rich_help_panel=P_RUN,
        ),
    ] = None,
    task_cpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="CPUs (and torch threads) of each Ray task; default: as many as torch uses here, so every file "
            "is the one a local run writes. Fewer run more tasks per node, with that many threads' sums.",
            rich_help_panel=P_RUN,
        ),
    ] = None,
) -> None:
    """Try every pruning × quantization combination; rank by SrCr, mark the Pareto front, write report.html.

    The axes are a recipe's [sweep] table (docs/recipe.md). Each configuration's manifest embeds its own
    recipe: srcr export --recipe SWEEP/NAME.manifest.json reproduces that one.
    """
    from srcr.exporter import api
    from srcr.exporter.flags import SWEEP_FLAGS, base_recipe, recipe_from_flags

    console = stderr_console()
    resumable = f"finished configurations and {out}/reference.npz are kept; rerun the same command to resume"
    converters = {
        "sparsity": lambda text: _split(text, float, "sparsity"),
        "pattern": lambda text: _split(text, str, "pattern"),
        "bits": lambda text: _split(text, int, "bits"),
        "quant_type": lambda text: _split(text, str, "quant-type"),
        "quantizer": lambda text: _split(text, str, "quantizer"),
        "structures": parse_structures,
        "lm_eval_tasks": _task_names,
    }
    with user_errors(console, interrupted=resumable) as interrupts:
        recipe = recipe_from_flags(ctx, SWEEP_FLAGS, base_recipe(recipe_file, sweep=True), converters)
        recipe = _allocating_axes(ctx, recipe)
        if print_recipe:
            typer.echo(recipe.to_toml(), nl=False)
            return
        with stage_progress(console, interrupts) as progress:
            result = api.sweep(
                recipe=recipe,
                out=out,
                allow_pickle=allow_pickle,
                progress=progress,
                executor=executor,
                ray_address=ray_address,
                cache=(cache_dir or True) if cache else False,
                task_cpus=task_cpus,
            )
    summary, report = result.summary, result.report
    if as_json:
        payload = {
            "records": summary.records,
            "pareto_tcr": sorted(summary.front_tcr),
            "pareto_bytes": sorted(summary.front_bytes),
            "pareto_speed": sorted(summary.front_speed),
            "equal_tcr": summary.equal_tcr,
            "recommended": summary.recommended["name"],
            "recommendation": summary.sentence,
            "tie": None if summary.tie is None else {"name": summary.tie["name"], **summary.tie["tie"]},
            "report": str(report),
        }
        typer.echo(json.dumps(payload, indent=2))
        return
    stdout = stdout_console()
    for table in sweep_tables(summary):
        stdout.print(table)
    stdout.print(summary.sentence)
    stdout.print(f"report: {report}")
