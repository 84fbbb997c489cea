"""Peak resident memory while pruning a randomly initialised ~1B-parameter Llama on CPU.

The model has Llama-3.2-1B's shapes (hidden 2048, intermediate 8192, 16 layers, 32 heads, 8 KV
heads, vocabulary 128256, tied embeddings: 1.24B parameters, 4.9 GB in float32), built from its
config with random weights. prune_model runs SparseGPT over a few random calibration samples;
a thread samples the process RSS every 20 ms. The point: pruning holds the model plus one decoder
layer's working set (its activations, one Hessian and its inverse), never a second copy of the model.

    .venv/bin/python bench/bench_prune_memory.py [--samples 4] [--seq-len 512] [--method sparsegpt]
        [--sparsity 0.5 | --pattern 2:4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import psutil
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rss import GIB, PeakRss  # noqa: E402
from srcr.exporter.pruning import PruneSpec, parse_pattern, prune_model  # noqa: E402
from srcr.exporter.verify import peak_rss_bytes  # noqa: E402

LLAMA_32_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    console = Console(stderr=True, width=120)
    process = psutil.Process()
    rss_start = process.memory_info().rss
    started = time.perf_counter()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**LLAMA_32_1B)).eval()
    build_s = time.perf_counter() - started
    parameters = sum(p.numel() for p in model.parameters())
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rss_model = process.memory_info().rss
    console.print(f"built {parameters / 1e9:.2f}B parameters in {build_s:.0f} s; RSS {rss_model / GIB:.2f} GiB")

    pattern = parse_pattern(args.pattern) if args.pattern else None
    spec = PruneSpec(method=args.method, sparsity=0.0 if pattern else args.sparsity, pattern=pattern)
    calib_ids = torch.randint(0, LLAMA_32_1B["vocab_size"], (args.samples, args.seq_len))

    def progress(description: str, completed: int, total: int) -> None:
        console.print(f"{description} ({time.perf_counter() - started:.0f} s)")

    with PeakRss() as peak:
        report = prune_model(model, calib_ids, spec, device="cpu", progress=progress)

    result = {
        "parameters": parameters,
        "parameter_gib": parameter_bytes / GIB,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "method": spec.method,
        "target_sparsity": spec.target_sparsity,
        "achieved_sparsity": report.overall_sparsity,
        "prune_seconds": report.seconds,
        "seconds_per_layer": report.seconds / LLAMA_32_1B["num_hidden_layers"],
        "rss_before_model_gib": rss_start / GIB,
        "rss_with_model_gib": rss_model / GIB,
        "peak_rss_while_pruning_gib": peak.peak / GIB,
        "pruning_overhead_gib": (peak.peak - rss_model) / GIB,
        "ru_maxrss_gib": peak_rss_bytes() / GIB,
        "torch_threads": torch.get_num_threads(),
    }
    table = Table(title="peak memory while pruning a random 1.24B Llama on CPU")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
