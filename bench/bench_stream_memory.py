"""Peak host memory of a whole export (calibrate + prune + convert + quantize), in memory and streamed, against depth.

Random bfloat16 Llamas with Llama-3.2-1B's widths (hidden 2048, intermediate 8192, 32 heads, 8 KV heads)
and SmolLM2's tokenizer (vocabulary 49152, tied embeddings), saved shard by shard as safetensors without
ever holding the model: 3 layers (0.28B parameters) and 18 layers (1.19B, 2.4 GB on disk). Each run is
`srcr export --sparsity 0.5 --quant-type Q4_0 --no-eval` (SparseGPT 50%, 8 x 256 calibration tokens) in a
child; a thread samples the RSS of that child and of its children (the quantizer runs in one) every 50 ms,
summed, both in total and anonymous (RssAnon: memory that is not a file's pages; llama.cpp maps the GGUF
it quantizes or runs, and those pages count in RSS but are the page cache's to drop). The baseline is a
process that has imported what the export imports. `--runs` lists layers:stream:format triples; the
default runs both paths (`--stream off`, in memory; `--stream on`) on 3 layers, the 18-layer model in
memory, and the 18-layer model with `--stream auto`, what the default does with it (the table's
`streamed` column says which path auto took). `--eval` adds a small evaluation (2 windows, 10 last-word
items, 3 prompts; in memory its torch reference borrows the model in float32); `3:off:onnx` measures the
ONNX exporter, which traces the whole model.

    .venv/bin/python bench/bench_stream_memory.py [--runs 3:off:gguf,3:on:gguf,18:off:gguf,18:auto:gguf]
        [--eval] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

GIB = 1024**3
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIDTHS = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
}
EXPORT = ["--sparsity", "0.5", "--quant-type", "Q4_0", "--calib-samples", "8", "--seq-len", "256"]
EVALUATION = [
    "--eval-windows", "2", "--last-word-items", "10", "--new-tokens", "8", "--no-builtin-prompts",
    "--prompts", str(ROOT / "tests" / "data" / "prompts_small.jsonl"),
]  # fmt: skip
RUNS = "3:off:gguf,3:on:gguf,18:off:gguf,18:auto:gguf"
BASELINE = (
    "import psutil, torch, transformers, llama_cpp, gguf, sentence_transformers; "
    "import srcr.exporter.pipeline, srcr.targets.gguf.target, srcr.evaluators.reference; "
    "anon = [int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith('RssAnon:')]; "
    "print(psutil.Process().memory_info().rss, anon[0])"
)


def build_model(folder: Path, layers: int) -> int:
    """The random bfloat16 Llama with SmolLM2's tokenizer files; return its parameter count."""
    from transformers import LlamaConfig

    from bench.random_llama import write_random_llama
    from srcr.exporter.models import ensure_default_checkpoint

    config = LlamaConfig(vocab_size=49152, num_hidden_layers=layers, dtype="bfloat16", **WIDTHS)
    config.bos_token_id, config.eos_token_id = 1, 2
    count = write_random_llama(folder, config)
    for file in ensure_default_checkpoint().iterdir():
        if file.name.startswith("tokenizer") or file.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copyfile(file, folder / file.name)
    return count


def _anon(process: psutil.Process) -> int:
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_export(model: Path, out: Path, stream: str, fmt: str, evaluate: bool) -> dict:
    command = [str(ROOT / ".venv" / "bin" / "srcr"), "export", "--model", str(model), "--out", str(out)]
    command += [*EXPORT, *(EVALUATION if evaluate else ["--no-eval"]), "--stream", stream, "--format", fmt, "--json"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = {"rss": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(child.pid)
        while not done.is_set():
            try:
                tree = [root, *root.children(recursive=True)]
                rss = sum(process.memory_info().rss for process in tree)
                anon = sum(_anon(process) for process in tree)
            except psutil.Error:
                break
            peak["rss"], peak["anon"] = max(peak["rss"], rss), max(peak["anon"], anon)
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    stdout, _ = child.communicate()
    done.set()
    thread.join()
    if child.returncode != 0:
        raise SystemExit(f"srcr export failed ({child.returncode})")
    manifest = json.loads(stdout)
    return {
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss": peak["rss"],
        "peak_anon": peak["anon"],
        "streamed": manifest["pruning"]["streamed"],
        "timings_s": manifest["timings_s"],
        "artifact_bytes": manifest["artifact"]["bytes"],
        "artifact_sha256": manifest["artifact"]["sha256"],
        "sr": manifest.get("sr"),
        "reference": manifest["device"].get("reference"),
    }


def print_table(rows: list[dict], baseline: int, baseline_anon: int) -> None:
    print(f"\nbaseline: {baseline / GIB:.2f} GiB RSS, {baseline_anon / GIB:.2f} GiB anonymous")
    columns = ["model", "parameters", "checkpoint", "mode", "streamed", "peak RSS above baseline"]
    print("| " + " | ".join([*columns, "peak anonymous above baseline", "wall"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        mode = f"`--stream {row['stream']}`" + (f" ({row['format']})" if row["format"] != "gguf" else "")
        print(
            f"| {row['layers']} layers | {row['parameters_b']:.2f}B | {row['checkpoint_gib']:.2f} GiB | {mode} | "
            f"{'yes' if row['streamed'] else 'no'} | {row['peak_rss_above_baseline_gib']:.2f} GiB | "
            f"**{row['peak_anon_above_baseline_gib']:.2f} GiB** | {row['seconds']:.0f} s |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=RUNS, help="layers:stream:format, ...")
    parser.add_argument("--eval", action="store_true", help="evaluate each artifact (small settings)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    printed = subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout
    baseline, baseline_anon = (int(value) for value in printed.split())
    rows = []
    runs = [(int(layers), stream, fmt) for layers, stream, fmt in (run.split(":") for run in args.runs.split(","))]
    parameters: dict[int, int] = {}
    (ROOT / "bench-results").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "bench-results") as scratch:
        for layers, stream, fmt in runs:
            model = Path(scratch) / f"llama-{layers}"
            if layers not in parameters:
                parameters[layers] = build_model(model, layers)
            on_disk = sum(file.stat().st_size for file in model.glob("*.safetensors"))
            result = run_export(model, Path(scratch) / f"out-{layers}-{stream}-{fmt}", stream, fmt, args.eval)
            row = {
                "layers": layers,
                "stream": stream,
                "format": fmt,
                "parameters_b": round(parameters[layers] / 1e9, 3),
                "checkpoint_gib": round(on_disk / GIB, 2),
                "baseline_rss_gib": round(baseline / GIB, 2),
                "baseline_anon_gib": round(baseline_anon / GIB, 2),
                "peak_rss_above_baseline_gib": round((result["peak_rss"] - baseline) / GIB, 2),
                "peak_anon_above_baseline_gib": round((result["peak_anon"] - baseline_anon) / GIB, 2),
                **{key: value for key, value in result.items() if key not in ("peak_rss", "peak_anon")},
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows, baseline, baseline_anon)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
