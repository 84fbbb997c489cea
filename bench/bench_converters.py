"""srcr's own GGUF writer against llama.cpp's convert_hf_to_gguf.py, on a family both convert (SmolLM2: llama).

For each converter, in a fresh child process: load the default model as the pipeline does (fp32), write an
F16 GGUF, and record the conversion's wall time and the peak resident memory it adds (the parent's, plus
the converter child's for llama.cpp's script). Then, in this process, each file runs in llama.cpp against
transformers on lee.cor windows (mean KL, top-1 agreement) and tokenizes lee.cor's lines (agreement with
transformers' tokenizer); the two files are compared tensor by tensor. Prints JSON.

    .venv/bin/python bench/bench_converters.py [--windows 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.rss import GIB, PeakRss  # noqa: E402

WINDOW = 512
CONVERTERS = ("srcr", "llama.cpp")


def convert_once(converter: str, out: Path) -> dict:
    """In a child: load as the pipeline does, convert to F16, report time and added memory."""
    from srcr.exporter.models import load_model
    from srcr.targets.gguf import target as gguf_target
    from srcr.targets.gguf.upstream import convert_with_llama_cpp

    loaded = load_model(None)
    hints = {**loaded.hints, "source_folder": str(loaded.path), "model_name": "SmolLM2-135M-Instruct"}
    with PeakRss() as peak:
        before = peak.process.memory_info().rss
        started = time.perf_counter()
        if converter == "srcr":
            gguf_target.convert_to_gguf(loaded.model, loaded.tokenizer, out, "F16", hints)
        else:
            convert_with_llama_cpp(loaded.model, loaded.tokenizer, out, "F16", hints)
        seconds = time.perf_counter() - started
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {
        "seconds": seconds,
        "added_rss_gib": (peak.peak - before) / GIB,
        "child_peak_rss_gib": child_peak / GIB if converter != "srcr" else 0.0,
    }


def measure_file(path: Path, model, tokenizer, windows: list[list[int]], lines: list[str]) -> dict:
    import torch

    from srcr.targets.gguf.runtime import LlamaCppRuntime

    runtime = LlamaCppRuntime(path)
    kls, agree = [], []
    try:
        for ids in windows:
            with torch.no_grad():
                reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()
            got = runtime.logprobs(ids)
            kls.append(float((np.exp(reference) * (reference - got)).sum(-1).mean()))
            agree.append(float((reference.argmax(-1) == got.argmax(-1)).mean()))
        same_tokens = sum(
            runtime.tokenize(line) == tokenizer(line, add_special_tokens=False)["input_ids"] for line in lines
        )
    finally:
        runtime.close()
    return {
        "mean_kl": statistics.fmean(kls),
        "top1_agreement": statistics.fmean(agree),
        "tokenizer_agreement": same_tokens / len(lines),
        "bytes": path.stat().st_size,
    }


def compare_tensors(first: Path, second: Path) -> dict:
    import gguf

    a = {tensor.name: tensor for tensor in gguf.GGUFReader(first).tensors}
    b = {tensor.name: tensor for tensor in gguf.GGUFReader(second).tensors}
    common = sorted(set(a) & set(b))
    identical = sum(
        a[name].tensor_type == b[name].tensor_type
        and np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data))
        for name in common
    )
    return {"only_srcr": sorted(set(a) - set(b)), "only_llama_cpp": sorted(set(b) - set(a)), "identical": identical,
            "common": len(common)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--one", choices=CONVERTERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(convert_once(args.one, args.out)))
        return

    from srcr.exporter.calibration import evaluation_text
    from srcr.exporter.models import load_default_model

    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        files = {}
        for converter in CONVERTERS:
            runs = []
            for repeat in range(args.repeats):
                out = Path(scratch) / f"{converter}-{repeat}.gguf"
                command = [sys.executable, __file__, "--one", converter, "--out", str(out)]
                runs.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
            files[converter] = out
            results[converter] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
        model, tokenizer = load_default_model()
        text = evaluation_text(None, None).text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        windows = [ids[start : start + WINDOW] for start in range(0, len(ids) - WINDOW + 1, WINDOW)][: args.windows]
        lines = [line for line in text.splitlines() if line.strip()]
        for converter, path in files.items():
            results[converter].update(measure_file(path, model, tokenizer, windows, lines))
        results["tensors"] = compare_tensors(files["srcr"], files["llama.cpp"])
    results["settings"] = {"windows": len(windows), "window": WINDOW, "repeats": args.repeats, "lines": len(lines)}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
