"""Streamed calibrate + prune of a Llama-3.1-8B-shaped model: seconds per decoder layer, peak device memory,
peak host memory.

A random bfloat16 model with Llama-3.1-8B's shapes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
vocabulary 128256, untied head) and only `--layers` decoder layers (2-4 are enough: every layer costs
the same) is written shard by shard, never held whole. Then exactly what `srcr export --stream on` runs
before conversion: the skeleton and its embedding are read, and each layer goes from disk to the device
in float32, is calibrated on `--samples` x `--seq-len` random tokens (the paper: 128 x 2048), pruned by
SparseGPT and written to a pruned folder. Needs torch, transformers, accelerate, safetensors and psutil:
no llama.cpp, gguf or onnxruntime, so it runs on the GPU check machine.

    python bench/bench_stream_prune.py --device cuda [--layers 4] [--samples 128] [--seq-len 2048]
    python bench/bench_stream_prune.py --device cpu --small     # the same code at 1/8 of the widths
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.random_llama import write_random_llama  # noqa: E402
from srcr.base.weights import FolderWriter, SafetensorsFolder  # noqa: E402
from srcr.exporter.models import open_source  # noqa: E402
from srcr.exporter.pruning import PruneSpec, prune_model  # noqa: E402
from srcr.exporter.streaming import FromDisk, finish_folder, open_streamed  # noqa: E402

GIB = 1024**3
LLAMA_31_8B = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
}


def write_model(folder: Path, layers: int, small: bool) -> int:
    """The random bfloat16 model, tokenizer-free: the bench feeds token ids."""
    from transformers import LlamaConfig

    shapes = dict(LLAMA_31_8B)
    if small:
        shapes.update(vocab_size=16032, hidden_size=512, intermediate_size=1792, num_attention_heads=4,
                      num_key_value_heads=1)  # fmt: skip
    return write_random_llama(folder, LlamaConfig(num_hidden_layers=layers, dtype="bfloat16", **shapes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--small", action="store_true", help="1/8 of the widths (a CPU smoke run)")
    parser.add_argument(
        "--default-heap", action="store_true", help="leave glibc's allocator as it is (srcr.base.memory off): for A/B"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.default_heap:
        import srcr.exporter.streaming as streaming

        streaming.map_large_blocks = lambda: False
        streaming.release_freed = lambda: None
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        parameters = write_model(folder, args.layers, args.small)
        source = open_source(str(folder))
        process = psutil.Process()
        weights = SafetensorsFolder(source.folder, source.weight_files)
        model = open_streamed(source, weights)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
        baseline = process.memory_info().rss
        peak, done = [baseline], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], process.memory_info().rss)
                done.wait(0.02)

        stamps: list[float] = []
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        writer = FolderWriter(Path(scratch) / "pruned")
        report = prune_model(
            model, ids, PruneSpec(method="sparsegpt", sparsity=0.5), device=str(device),
            progress=lambda *_: stamps.append(time.perf_counter()), home=FromDisk(model, weights, writer),
        )  # fmt: skip
        finish_folder(source, weights, writer)
        total = time.perf_counter() - started
        done.set()
        thread.join()
        per_layer = [b - a for a, b in zip([started, *stamps[:-1]], stamps, strict=True)]
        result = {
            "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
            "shapes": "Llama-3.1-8B / 8" if args.small else "Llama-3.1-8B",
            "layers": args.layers,
            "parameters_b": round(parameters / 1e9, 3),
            "calibration": f"{args.samples} x {args.seq_len}",
            # The first layer also catches the calibration inputs (the embedding pass) and warms the kernels.
            "seconds_per_layer_median": round(statistics.median(per_layer[1:] or per_layer), 2),
            "seconds_first_layer": round(per_layer[0], 2),
            "seconds_total": round(total, 1),
            "achieved_sparsity": round(report.overall_sparsity, 4),
            "peak_host_rss_above_baseline_gib": round((peak[0] - baseline) / GIB, 2),
            "peak_device_gib": round(torch.cuda.max_memory_allocated() / GIB, 2) if device.type == "cuda" else None,
        }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
