"""llama.cpp's extra CPU buffer types (weight repacking; AMX where offered) on and off, on this machine.

srcr turns the extra buffer types off when the CPU backend offers AMX (its matrix multiplication
crashes on 400-token batches, docs/gguf.md); everywhere else they stay on. This prints what that
costs or saves: prompt tokens/s (8 windows of 512 tokens of lee.cor, one batch each, as the
perplexity evaluator runs them) and generation tokens/s (greedy, 32 tokens after a short prompt),
for SmolLM2-135M in Q4_K_M (llama.cpp's mix), pure Q4_0 and pure Q8_0, with the buffers on and off.

    python bench/bench_cpu_buffers.py [--repeats 3] [--json bench-results/cpu_buffers.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from srcr.base.runtime import available_threads  # noqa: E402
from srcr.targets.gguf.backends import cpu_extra_buffer_types, decide_cpu_buffers  # noqa: E402

TYPES = (("Q4_K_M", False), ("Q4_0", True), ("Q8_0", True))
WINDOWS, WINDOW_LEN, NEW_TOKENS = 8, 512, 32


def build_files(folder: Path) -> dict[str, Path]:
    import json as json_module

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srcr.exporter.models import HINTS_FILE, ensure_default_checkpoint
    from srcr.targets.gguf.convert import convert_to_gguf
    from srcr.targets.gguf.quantize import quantize_gguf

    checkpoint = ensure_default_checkpoint()
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    hints = json_module.loads((checkpoint / HINTS_FILE).read_text())
    f32 = folder / "f32.gguf"
    convert_to_gguf(model, tokenizer, f32, "F32", hints)
    files = {}
    for quant_type, pure in TYPES:
        files[quant_type] = folder / f"{quant_type}.gguf"
        quantize_gguf(f32, files[quant_type], quant_type, None, pure=pure)
    return files


def measure(path: Path, use_extra: bool, windows: list[list[int]], repeats: int) -> dict[str, float]:
    from srcr.targets.gguf.runtime import LlamaCppRuntime

    plan = decide_cpu_buffers(cpu_extra_buffer_types(), "on" if use_extra else "off")
    runtime = LlamaCppRuntime(path, n_ctx=WINDOW_LEN, cpu_buffers=plan)
    try:
        runtime.logprobs(windows[0], first_row=WINDOW_LEN // 2)  # warm-up: repacking happens at load, caches here
        prompt, generation = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            for window in windows:
                runtime.forward(window, reset=True, first_row=WINDOW_LEN - 1)
            prompt.append(len(windows) * WINDOW_LEN / (time.perf_counter() - start))
            start = time.perf_counter()
            produced = sum(len(runtime.generate(window[:16], NEW_TOKENS)) for window in windows)
            generation.append(produced / (time.perf_counter() - start))
    finally:
        runtime.close()
    return {"prompt_tokens_per_s": statistics.median(prompt), "generation_tokens_per_s": statistics.median(generation)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    console = Console(stderr=True)

    from transformers import AutoTokenizer

    from srcr.exporter.calibration import evaluation_text
    from srcr.exporter.models import ensure_default_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_checkpoint())
    ids = tokenizer(evaluation_text(None, None).text, add_special_tokens=False)["input_ids"]
    windows = [ids[start : start + WINDOW_LEN] for start in range(0, WINDOWS * WINDOW_LEN, WINDOW_LEN)]
    available = cpu_extra_buffer_types()
    report: dict = {"threads": available_threads(), "cpu_extra_buffer_types": list(available), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        console.print("building the GGUF files")
        files = build_files(Path(tmp))
        for quant_type, path in files.items():
            for use_extra in (True, False):
                if use_extra and "AMX" in available:
                    console.print(f"{quant_type}: skipping extra buffers on (AMX offered: the crashing case)")
                    continue
                console.print(f"{quant_type}: extra buffers {'on' if use_extra else 'off'}")
                figures = measure(path, use_extra, windows, args.repeats)
                report["results"].append({"type": quant_type, "extra_buffers": use_extra, **figures})
    table = Table(title=f"llama.cpp extra CPU buffer types ({', '.join(available) or 'none offered'})")
    for header in ("type", "extra buffers", "prompt tok/s", "generation tok/s"):
        table.add_column(header, justify="left" if header == "type" else "right")
    for row in report["results"]:
        table.add_row(
            row["type"],
            "on" if row["extra_buffers"] else "off",
            f"{row['prompt_tokens_per_s']:.0f}",
            f"{row['generation_tokens_per_s']:.1f}",
        )
    Console().print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
