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
    "with zero points or --symmetric)."
)
STREAM_HELP = (
    "Read the decoder layers from the checkpoint one at a time (auto: when the model takes over half the free "
    "memory; on; off). Streamed, host memory holds one layer, the embedding and the activations (GGUF only)."
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


@app.command()
def export(
    sparsity: Annotated[
        float, typer.Option(help="Unstructured sparsity: fraction of each pruned linear's weights zeroed, in [0, 1).")
    ] = 0.0,
    pattern: Annotated[str | None, typer.Option(help=PATTERN_HELP)] = None,
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "sparsegpt",
    percdamp: Annotated[float, typer.Option(help=PERCDAMP_HELP)] = 0.01,
    prune_block_size: Annotated[int, typer.Option(help=PRUNE_BLOCK_HELP)] = 128,
    drop_layers: Annotated[float, typer.Option(help=DROP_HELP)] = 0.0,
    depth_method: Annotated[str, typer.Option(help=DEPTH_HELP)] = "bi",
    ffn_ratio: Annotated[float, typer.Option(help=FFN_HELP)] = 0.0,
    head_ratio: Annotated[float, typer.Option(help=HEAD_HELP)] = 0.0,
    width_method: Annotated[str, typer.Option(help=WIDTH_METHOD_HELP)] = "flap",
    width_allocation: Annotated[str, typer.Option(help=ALLOCATION_HELP)] = "uniform",
    width_multiple: Annotated[int, typer.Option(help=MULTIPLE_HELP)] = 0,
    bits: Annotated[
        int | None,
        typer.Option(help="Quantization bit-width (GGUF: 2,3,4,5,6,8,16; ONNX: 2,4,8,16,32). Default 4."),
    ] = None,
    quant_type: Annotated[
        str | None, typer.Option(help="Name the format's quantization type directly, e.g. Q4_K_M or IQ2_XXS.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="Deployment format: gguf or onnx.")] = "gguf",
    model: Annotated[
        str | None,
        typer.Option(help="Local Hugging Face folder or hub id. Default: the embedded SmolLM2-135M-Instruct."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("out"),
    name: Annotated[
        str | None, typer.Option(help="Base file name of the outputs, without a folder (default: from the settings).")
    ] = None,
    calib: Annotated[
        Path | None,
        typer.Option(help="Calibration text: plain text or JSONL with a `text` field. Default: gensim's Lee corpus."),
    ] = None,
    calib_encoding: Annotated[str | None, typer.Option(help=ENCODING_HELP.format(what="--calib"))] = None,
    calib_samples: Annotated[
        int | None, typer.Option(help="Calibration samples (default 128, capped by the corpus).")
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration sample (default 2048).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration windows.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    quant_block_size: Annotated[
        int | None,
        typer.Option(help="ONNX: weights per quantization block (default 32; formerly --block-size)."),
    ] = None,
    quant_algo: Annotated[
        str | None, typer.Option(help="ONNX: weight quantization algorithm: wls (default), hqq or rtn.")
    ] = None,
    quant_scheme: Annotated[
        str | None, typer.Option(help="ONNX: weight-only (default) or dynamic (int8 weights and activations).")
    ] = None,
    symmetric: Annotated[
        bool | None, typer.Option("--symmetric/--asymmetric", help="ONNX: symmetric or asymmetric blocks.")
    ] = None,
    quantizer: Annotated[str | None, typer.Option(help=QUANTIZER_HELP)] = None,
    evaluate: Annotated[
        bool, typer.Option("--eval/--no-eval", help="Measure the exported artifact against the dense model.")
    ] = True,
    eval_text: Annotated[
        Path | None, typer.Option(help="Held-out evaluation text (default: gensim's lee.cor).")
    ] = None,
    eval_encoding: Annotated[str | None, typer.Option(help=ENCODING_HELP.format(what="--eval-text"))] = None,
    prompts: Annotated[Path | None, typer.Option(help="Extra prompts (JSONL) for semantic similarity.")] = None,
    tasks: Annotated[
        Path | None, typer.Option(help='Multiple-choice tasks (JSONL: {"context", "choices", "answer"}).')
    ] = None,
    eval_windows: Annotated[
        int | None, typer.Option(help="Number of evaluation windows (default 8 × 512 tokens).")
    ] = None,
    last_word_items: Annotated[
        int | None, typer.Option(help="Last-word accuracy items taken from the evaluation text (default 100; 0 skips).")
    ] = None,
    new_tokens: Annotated[
        int | None, typer.Option(help="Greedy tokens generated per prompt for semantic similarity (default 32).")
    ] = None,
    builtin_prompts: Annotated[
        bool, typer.Option(help="Include the 52 built-in prompts (--no-builtin-prompts: only --prompts FILE).")
    ] = True,
    top_k: Annotated[
        int | None, typer.Option(help="Reference pack: top-k log-probabilities kept per position (default 128).")
    ] = None,
    lm_eval_tasks: Annotated[str | None, typer.Option(help=LM_EVAL_TASKS_HELP)] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(help=LM_EVAL_INCLUDE_HELP)] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help=LM_EVAL_LIMIT_HELP)] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing output files.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option(help="Allow pickled .bin weights (they can run code: only for sources you trust).")
    ] = False,
    stream: Annotated[str, typer.Option(help=STREAM_HELP)] = "auto",
    reference: Annotated[str, typer.Option(help=REFERENCE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON instead of the table.")] = False,
) -> None:
    """Prune, quantize and export a model; evaluate the artifact and write its manifest."""
    from srcr.exporter.pipeline import EvalOptions, ExportOptions, run_export
    from srcr.exporter.pruning.structured import StructureSpec

    console = stderr_console()
    with user_errors(console) as interrupts:
        target_options = {
            key: value
            for key, value in {
                "quant_block_size": quant_block_size,
                "quant_algo": quant_algo,
                "quant_scheme": quant_scheme,
                "symmetric": symmetric,
                "quantizer": quantizer,
            }.items()
            if value is not None
        }
        options = ExportOptions(
            model=model,
            format=fmt,
            bits=bits,
            quant_type=quant_type,
            target_options=target_options,
            method=method,
            sparsity=sparsity,
            pattern=pattern,
            percdamp=percdamp,
            prune_block_size=prune_block_size,
            structure=StructureSpec(
                drop_layers=drop_layers,
                depth_method=depth_method,
                ffn_ratio=ffn_ratio,
                head_ratio=head_ratio,
                width_method=width_method,
                allocation=width_allocation,
                multiple=width_multiple,
            ),
            calib=calib,
            calib_encoding=calib_encoding,
            calib_samples=calib_samples,
            seq_len=seq_len,
            seed=seed,
            device=device,
            out=out,
            name=name,
            overwrite=overwrite,
            allow_pickle=allow_pickle,
            stream=stream,
            reference=reference,
            evaluation=EvalOptions(
                enabled=evaluate,
                eval_text=eval_text,
                eval_encoding=eval_encoding,
                prompts=prompts,
                tasks=tasks,
                windows=eval_windows,
                top_k=top_k,
                last_word_items=last_word_items,
                new_tokens=new_tokens,
                builtin_prompts=builtin_prompts,
                lm_eval_tasks=_task_names(lm_eval_tasks),
                lm_eval_include=lm_eval_include,
                lm_eval_limit=lm_eval_limit,
            ),
        )
        with stage_progress(console, interrupts) as progress:
            manifest = run_export(options, progress)
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
    from srcr.exporter.verify import verify as run_verify

    console = stderr_console()
    with user_errors(console) as interrupts:
        limits = _parse_tolerances(tolerance or [])
        with stage_progress(console, interrupts) as progress:
            outcome = run_verify(manifest, limits, device=device, progress=progress, mode=tolerance_mode)
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


def parse_structures(text: str) -> list[Any]:
    """`none;ffn=0.25;layers=0.2,depth=sleb` -> StructureSpecs (multiple 0: the target's block width)."""
    from srcr.base.errors import SrcrError
    from srcr.exporter.pruning.structured import StructureSpec

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
        specs.append(StructureSpec(**values))
    if not specs:
        raise SrcrError("--structures is empty; pass 'none' for no structured pruning")
    return specs


def common_name_prefix(names: list[str]) -> str:
    """The shared leading part of the configurations' names, cut at a '-' (the model's slug)."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind("-") + 1]


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
            _fmt(record["kld"], ".4f"),
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


@app.command()
def sweep(
    sparsity: Annotated[str, typer.Option(help="Unstructured sparsities to try, comma-separated.")] = "0,0.25,0.5",
    pattern: Annotated[str, typer.Option(help="N:M patterns to try, comma-separated (e.g. 2:8,2:4).")] = "",
    structures: Annotated[
        str,
        typer.Option(
            help="Structured settings to cross with the others, ';'-separated: none, or key=value pairs "
            "(layers, depth, ffn, heads, width, allocation), e.g. 'none;ffn=0.25;layers=0.2,depth=sleb'."
        ),
    ] = "none",
    bits: Annotated[
        str, typer.Option(help="Bit-widths to try, comma-separated ('' for none: only --quant-type).")
    ] = "2,3,4,8",
    quant_type: Annotated[
        str, typer.Option(help="The format's type names to try beside --bits, comma-separated (e.g. Q4_0,Q5_0).")
    ] = "",
    quantizer: Annotated[
        str,
        typer.Option(
            help="Quantizers to try, comma-separated (e.g. llama.cpp,gptq; default: the format's own). "
            "gptq is srcr's GPTQ on the format's exact grid, see srcr export --help."
        ),
    ] = "",
    fmt: Annotated[str, typer.Option("--format", help="Deployment format: gguf or onnx.")] = "gguf",
    method: Annotated[str, typer.Option(help=METHOD_HELP)] = "sparsegpt",
    percdamp: Annotated[float, typer.Option(help=PERCDAMP_HELP)] = 0.01,
    prune_block_size: Annotated[int, typer.Option(help=PRUNE_BLOCK_HELP)] = 128,
    model: Annotated[str | None, typer.Option(help="Local Hugging Face folder or hub id (default: SmolLM2).")] = None,
    out: Annotated[Path, typer.Option(help="Sweep folder; rerunning with the same folder resumes.")] = Path("sweep"),
    budget_mb: Annotated[
        float | None, typer.Option(help="Recommend the highest Sr whose file fits this many MB.")
    ] = None,
    min_retention: Annotated[
        float | None, typer.Option(help="Recommend the most compression with Sr at least this.")
    ] = None,
    calib: Annotated[Path | None, typer.Option(help="Calibration text (default: gensim's Lee corpus).")] = None,
    calib_encoding: Annotated[str | None, typer.Option(help=ENCODING_HELP.format(what="--calib"))] = None,
    calib_samples: Annotated[int | None, typer.Option(help="Calibration samples (default 128, capped).")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per calibration sample (default 2048).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for choosing calibration windows.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    eval_text: Annotated[Path | None, typer.Option(help="Held-out evaluation text (default: lee.cor).")] = None,
    eval_encoding: Annotated[str | None, typer.Option(help=ENCODING_HELP.format(what="--eval-text"))] = None,
    prompts: Annotated[Path | None, typer.Option(help="Extra prompts (JSONL) for semantic similarity.")] = None,
    tasks: Annotated[Path | None, typer.Option(help="Multiple-choice tasks (JSONL).")] = None,
    eval_windows: Annotated[int | None, typer.Option(help="Number of evaluation windows.")] = None,
    last_word_items: Annotated[int | None, typer.Option(help="Last-word accuracy items (default 100).")] = None,
    new_tokens: Annotated[int | None, typer.Option(help="Greedy tokens per prompt (default 32).")] = None,
    builtin_prompts: Annotated[bool, typer.Option(help="Include the built-in prompts.")] = True,
    lm_eval_tasks: Annotated[str | None, typer.Option(help=LM_EVAL_TASKS_HELP)] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(help=LM_EVAL_INCLUDE_HELP)] = None,
    lm_eval_limit: Annotated[int | None, typer.Option(help=LM_EVAL_LIMIT_HELP)] = None,
    allow_pickle: Annotated[bool, typer.Option(help="Allow pickled .bin weights (trusted sources only).")] = False,
    stream: Annotated[str, typer.Option(help=STREAM_HELP)] = "auto",
    reference: Annotated[str, typer.Option(help=REFERENCE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the records and recommendation as JSON.")] = False,
) -> None:
    """Try every pruning × quantization combination; rank by SrCr, mark the Pareto front, write report.html."""
    from srcr.exporter.pipeline import EvalOptions, PruneOptions
    from srcr.exporter.sweep import SweepOptions, run_sweep, summarize, write_report

    console = stderr_console()
    resumable = f"finished configurations and {out}/reference.npz are kept; rerun the same command to resume"
    with user_errors(console, interrupted=resumable) as interrupts:
        options = SweepOptions(
            model=model,
            format=fmt,
            sparsities=_split(sparsity, float, "sparsity"),
            patterns=_split(pattern, str, "pattern"),
            bits=_split(bits, int, "bits"),
            quantizers=_split(quantizer, str, "quantizer") or [None],
            quant_types=_split(quant_type, str, "quant-type"),
            prune=PruneOptions(method=method, percdamp=percdamp, block_size=prune_block_size),
            structures=parse_structures(structures),
            calib=calib,
            calib_encoding=calib_encoding,
            calib_samples=calib_samples,
            seq_len=seq_len,
            seed=seed,
            device=device,
            out=out,
            allow_pickle=allow_pickle,
            stream=stream,
            reference=reference,
            evaluation=EvalOptions(
                eval_text=eval_text,
                eval_encoding=eval_encoding,
                prompts=prompts,
                tasks=tasks,
                windows=eval_windows,
                last_word_items=last_word_items,
                new_tokens=new_tokens,
                builtin_prompts=builtin_prompts,
                lm_eval_tasks=_task_names(lm_eval_tasks),
                lm_eval_include=lm_eval_include,
                lm_eval_limit=lm_eval_limit,
            ),
        )
        with stage_progress(console, interrupts) as progress:
            manifests = run_sweep(options, progress)
        summary = summarize(manifests, budget_mb, min_retention)
        report = write_report(summary, out, f"srcr sweep: {manifests[0].source_model.id} ({fmt})")
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
