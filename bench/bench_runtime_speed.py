"""Prompt and generation speed of exported artifacts in their own runtimes, against the first one given.

For structured pruning: does a file with fewer layers or narrower layers really run faster than its
dense twin at the same quantization? Each artifact (GGUF in llama.cpp, ONNX in ONNX Runtime) scores 8
windows of 512 tokens of lee.cor in one batch each (prompt tokens/s) and greedily generates 32 tokens
after 16-token prompts (generation tokens/s); passes alternate between the artifacts so a drift of
the machine's speed hits all of them alike. Median of --repeats passes.

    python bench/bench_runtime_speed.py DENSE.gguf PRUNED.gguf [...] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from srcr.targets.registry import get_target  # noqa: E402

WINDOWS, WINDOW_LEN, PROMPT_LEN, NEW_TOKENS = 8, 512, 16, 32


def windows_of_lee() -> list[list[int]]:
    from transformers import AutoTokenizer

    from srcr.exporter.calibration import evaluation_text
    from srcr.exporter.models import ensure_default_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_checkpoint())
    ids = tokenizer(evaluation_text(None, None).text, add_special_tokens=False)["input_ids"]
    return [ids[start : start + WINDOW_LEN] for start in range(0, WINDOWS * WINDOW_LEN, WINDOW_LEN)]


def one_pass(path: Path, windows: list[list[int]]) -> tuple[float, float]:
    runtime = get_target(path.suffix.lstrip(".")).open_runtime(path, device="cpu")
    try:
        runtime.forward(windows[0][:64], reset=True, first_row=63)  # warm caches and lazy set-up
        start = time.perf_counter()
        for window in windows:
            runtime.forward(window, reset=True, first_row=len(window) - 1)
        prompt = len(windows) * WINDOW_LEN / (time.perf_counter() - start)
        start, produced = time.perf_counter(), 0
        for window in windows:
            produced += len(runtime.generate(window[:PROMPT_LEN], NEW_TOKENS))
        generation = produced / (time.perf_counter() - start)
    finally:
        runtime.close()
    return prompt, generation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", nargs="+", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console(stderr=True)
    windows = windows_of_lee()
    passes: dict[Path, list[tuple[float, float]]] = {path: [] for path in args.artifacts}
    for repeat in range(args.repeats):
        for path in args.artifacts:
            console.print(f"pass {repeat + 1}/{args.repeats}: {path.name}")
            passes[path].append(one_pass(path, windows))
    rows = []
    for path, measured in passes.items():
        prompt = statistics.median(value for value, _ in measured)
        generation = statistics.median(value for _, value in measured)
        rows.append({"artifact": str(path), "bytes": path.stat().st_size, "prompt_tokens_per_s": prompt,
                     "generation_tokens_per_s": generation, "passes": measured})  # fmt: skip
    base = rows[0]
    names = [Path(row["artifact"]).name for row in rows]
    prefix = os.path.commonprefix(names) if len(names) > 1 else ""
    table = Table(title="runtime speed against the first artifact")
    for header in ("artifact", "MB", "prompt tok/s", "×", "generation tok/s", "×"):
        table.add_column(header, justify="left" if header == "artifact" else "right")
    for row in rows:
        row["prompt_ratio"] = row["prompt_tokens_per_s"] / base["prompt_tokens_per_s"]
        row["generation_ratio"] = row["generation_tokens_per_s"] / base["generation_tokens_per_s"]
        table.add_row(
            Path(row["artifact"]).name[len(prefix) :] or Path(row["artifact"]).name,
            f"{row['bytes'] / 1e6:.1f}",
            f"{row['prompt_tokens_per_s']:.0f}",
            f"{row['prompt_ratio']:.2f}",
            f"{row['generation_tokens_per_s']:.1f}",
            f"{row['generation_ratio']:.2f}",
        )
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
