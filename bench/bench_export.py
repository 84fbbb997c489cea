"""End-to-end `srcr export` per stage: wall time and peak resident memory.

Runs the same pipeline as the CLI (exporter.pipeline.run_export) in this process, by default the
README's main job on the embedded SmolLM2 (SparseGPT 25% + GGUF Q4_K_M), into a temporary folder
that is deleted afterwards. Wall time per stage comes from the manifest the export writes
(`timings_s`); a thread samples RSS every 20 ms and attributes each sample to the stage in flight,
and the overall peak is the kernel's own maximum.

    .venv/bin/python bench/bench_export.py [--format gguf] [--bits 4] [--sparsity 0.25]
        [--method sparsegpt] [--calib-samples N] [--seq-len N] [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rss import GIB, PeakRss  # noqa: E402
from srcr.exporter.pipeline import StageTimer, run_export  # noqa: E402
from srcr.exporter.recipe import Recipe  # noqa: E402
from srcr.exporter.ui import quiet_libraries  # noqa: E402
from srcr.exporter.verify import peak_rss_bytes  # noqa: E402

STAGE_ORDER = ("load", "reference", "calibrate_prune", "convert", "quantize", "evaluate")


def run(recipe: Recipe, out: Path) -> dict:
    """Export once; per-stage seconds (from the manifest) and peak RSS (sampled) as a dict."""
    timer = StageTimer()
    started = time.perf_counter()
    with PeakRss(phase=lambda: timer.current) as peak:
        manifest = run_export(recipe, out, timer=timer).as_dict()
    wall = time.perf_counter() - started
    seconds = manifest["timings_s"]
    # convert and quantize run inside the single "export" stage the timer sees while it runs.
    stage_peak = dict(peak.by_phase)
    if "export" in stage_peak:
        stage_peak["convert"] = stage_peak["quantize"] = stage_peak.pop("export")
    stages = [
        {"stage": name, "seconds": seconds.get(name), "peak_rss_gib": stage_peak.get(name, 0) / GIB}
        for name in STAGE_ORDER
        if name in seconds
    ]
    calibration = manifest["pruning"].get("calibration") or {}
    return {
        "model": manifest["source_model"]["id"],
        "format": manifest["format"],
        "quant_type": manifest["quantization"]["type"],
        "sparsity": manifest["pruning"]["sparsity"],
        "method": manifest["pruning"]["method"],
        "calibration": f"{calibration.get('samples')}x{calibration.get('seq_len')}",
        "artifact_mb": manifest["artifact"]["bytes"] / 1e6,
        "sr": manifest.get("sr"),
        "stages": stages,
        "wall_seconds": wall,
        "unattributed_seconds": wall - sum(stage["seconds"] for stage in stages),
        "peak_rss_gib": peak_rss_bytes() / GIB,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def table(result: dict) -> Table:
    title = (
        f"srcr export {result['model']} → {result['format']} {result['quant_type']}, "
        f"{result['method']} {result['sparsity'] or 0:.0%}, calibration {result['calibration']}"
    )
    out = Table(title=title)
    out.add_column("stage")
    out.add_column("seconds", justify="right")
    out.add_column("share", justify="right")
    out.add_column("peak RSS GiB", justify="right")
    for stage in result["stages"]:
        share = stage["seconds"] / result["wall_seconds"]
        out.add_row(stage["stage"], f"{stage['seconds']:.1f}", f"{share:.0%}", f"{stage['peak_rss_gib']:.2f}")
    out.add_row("(between stages)", f"{result['unattributed_seconds']:.1f}", "", "")
    out.add_row("total", f"{result['wall_seconds']:.1f}", "100%", f"{result['peak_rss_gib']:.2f}", style="bold")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="local HF folder (default: the embedded SmolLM2)")
    parser.add_argument("--format", default="gguf")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.25)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--calib-samples", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True, width=120)
    with tempfile.TemporaryDirectory(prefix="srcr-bench-export-") as out:
        recipe = Recipe.model_validate(
            {
                "model": {"source": args.model},
                "export": {"format": args.format},
                "quantize": {"bits": args.bits},
                "prune": {"method": args.method, "sparsity": args.sparsity},
                "calibration": {"samples": args.calib_samples, "seq_len": args.seq_len},
            }
        )
        result = run(recipe, Path(out))
    console.print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
