"""Evaluation throughput through llama.cpp and ONNX Runtime, against each runtime's own raw speed.

Each artifact is opened through its target's `open_runtime` (the Runtime the evaluators use) and,
on the same tokens, measured two ways:

- scoring (prompt processing): `pack.distribution.score(runtime)` over the reference pack's windows
  (runtime.logprobs per window, then KL / top-1 / perplexity against the pack), against the library
  called directly on the same windows: llama.cpp `Llama.eval` from an empty cache with every logit
  kept, or one `InferenceSession.run` from an empty KV cache;
- generation: `pack.semantic.score(runtime)` over the pack's prompts (greedy runtime.generate, then
  sentence embeddings), against a plain greedy loop with the library (llama.cpp `eval` token by
  token, ONNX Runtime `run` with the KV cache fed back). The raw loop is fed the tokens the runtime
  generated and makes the same number of decode calls, so both decode identical sequences; its own
  arg-max is checked against them.

Both sides use the same threads, context, batch size, providers and session options, so the ratio
ours / raw is the evaluators' overhead alone. "evaluator" seconds are the evaluators' own timing of
the runtime calls (what the manifest's speed figures report); "wall" seconds the whole scoring call.
Each figure is the median of --repeats passes after one warm-up; ours and raw alternate per pass.
The full `evaluators.reference.evaluate` is run once more, warm, and split by stage as context.

With neither --gguf nor --onnx, the embedded SmolLM2-135M-Instruct is exported dense at 4 bits to
both formats through `srcr export` into --build DIR (kept there and reused on the next run).

    .venv/bin/python bench/bench_eval_throughput.py [--gguf PATH] [--onnx PATH] [--build DIR]
        [--model ID] [--export-args "--calib-samples 16"] [--repeats 3] [--device auto|cpu|cuda]
        [--torch-threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from srcr.base.errors import SrcrError  # noqa: E402
from srcr.base.runtime import Runtime  # noqa: E402
from srcr.evaluators.embedder import load_embedder  # noqa: E402
from srcr.evaluators.reference import ReferencePack, evaluate  # noqa: E402
from srcr.exporter.manifest import read_manifest  # noqa: E402
from srcr.targets.registry import get_target  # noqa: E402

FORMATS = ("gguf", "onnx")
SUFFIXES = {"gguf": ".gguf", "onnx": ".onnx"}
DEFAULT_BUILD = REPO / "out" / "bench_eval_throughput"
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


# --- inputs -------------------------------------------------------------------------------------------------------


def reference_pack_for(artifact: Path) -> Path:
    """The pack the artifact's manifest names (a sweep shares one), else `<name>.reference.npz` beside it."""
    manifest_path = artifact.with_name(f"{artifact.stem}.manifest.json")
    if manifest_path.is_file():
        evaluation = read_manifest(manifest_path).evaluation
        if evaluation is not None:
            return artifact.with_name(evaluation.reference_pack.file)
    return artifact.with_name(f"{artifact.stem}.reference.npz")


def check_artifact(artifact: Path, fmt: str) -> Path:
    if not artifact.is_file():
        raise SrcrError(f"{artifact} does not exist; pass a file written by `srcr export --format {fmt}`")
    if artifact.suffix != SUFFIXES[fmt]:
        raise SrcrError(f"--{fmt} expects a {SUFFIXES[fmt]} file, got {artifact.name}; pass the exported artifact")
    pack = reference_pack_for(artifact)
    if not pack.is_file():
        raise SrcrError(f"{pack} is missing; export {artifact.name} with evaluation on (drop --no-eval)")
    return pack


def export_command(fmt: str, out: Path, name: str, model: str | None, extra: Sequence[str]) -> list[str]:
    """`srcr export` for a dense 4-bit artifact with its reference pack (evaluation stays on)."""
    command = [sys.executable, "-c", "from srcr.exporter.cli import app; app(prog_name='srcr')", "export"]
    command += ["--sparsity", "0", "--bits", "4", "--format", fmt, "--out", str(out), "--name", name]
    if model:
        command += ["--model", model]
    return command + list(extra)


def build_artifacts(out: Path, model: str | None, extra: Sequence[str], console: Console) -> dict[str, Path]:
    """Dense 4-bit GGUF and ONNX exports in `out`; ones already there (artifact, pack, manifest) are reused."""
    artifacts = {}
    for fmt in FORMATS:
        name = f"dense-q4-{fmt}"
        artifact = out / f"{name}{SUFFIXES[fmt]}"
        complete = artifact.is_file() and (out / f"{name}.manifest.json").is_file()
        if not (complete and reference_pack_for(artifact).is_file()):
            command = export_command(fmt, out, name, model, extra)
            console.print(f"exporting: srcr {shlex.join(command[3:])}")
            # --overwrite only replaces what an interrupted earlier run may have left half-way.
            done = subprocess.run([*command, "--overwrite"], cwd=REPO)
            if done.returncode != 0:
                raise SrcrError(f"srcr export --format {fmt} failed (exit {done.returncode}); see its message above")
        artifacts[fmt] = artifact
    return artifacts


# --- the libraries called directly --------------------------------------------------------------------------------


class RawLlamaCpp:
    """llama.cpp's C API driven directly, with the GGUF runtime's model and context settings: every window
    decoded in one batch with logits for every position, as llama-perplexity does."""

    def __init__(self, artifact: Path, runtime: Any) -> None:
        from llama_cpp import llama_cpp as capi

        self.capi = capi
        params = capi.llama_model_default_params()
        params.n_gpu_layers = runtime.n_gpu_layers
        params.use_extra_bufts = runtime.cpu_buffers.use_extra_buffers
        self.model = capi.llama_model_load_from_file(str(artifact).encode(), params)
        context = capi.llama_context_default_params()
        context.n_ctx = context.n_batch = runtime.context_length
        context.n_ubatch = min(512, runtime.context_length)
        context.n_threads = context.n_threads_batch = runtime.n_threads
        self.ctx = capi.llama_init_from_model(self.model, context)
        self.n_vocab = capi.llama_vocab_n_tokens(capi.llama_model_get_vocab(self.model))
        self.n_past = 0

    def _decode(self, tokens: list[int], all_logits: bool) -> np.ndarray:
        capi = self.capi
        batch = capi.llama_batch_init(len(tokens), 0, 1)
        try:
            for index, token in enumerate(tokens):
                batch.token[index] = token
                batch.pos[index] = self.n_past + index
                batch.n_seq_id[index] = 1
                batch.seq_id[index][0] = 0
                batch.logits[index] = all_logits or index == len(tokens) - 1
            batch.n_tokens = len(tokens)
            capi.llama_decode(self.ctx, batch)
        finally:
            capi.llama_batch_free(batch)
        self.n_past += len(tokens)
        rows = len(tokens) if all_logits else 1
        return np.ctypeslib.as_array(capi.llama_get_logits(self.ctx), shape=(rows, self.n_vocab)).copy()

    def _reset(self) -> None:
        self.capi.llama_memory_clear(self.capi.llama_get_memory(self.ctx), True)
        self.n_past = 0

    def window_logits(self, tokens: list[int]) -> np.ndarray:
        self._reset()
        return self._decode(tokens, all_logits=True)

    def prefill(self, tokens: list[int]) -> np.ndarray:
        self._reset()
        return self._decode(tokens, all_logits=False)[-1]

    def step(self, token: int) -> np.ndarray:
        return self._decode([token], all_logits=False)[-1]

    def close(self) -> None:
        self.capi.llama_free(self.ctx)
        self.capi.llama_model_free(self.model)


class RawOrt:
    """One InferenceSession over the .onnx with the ONNX runtime's providers and session options."""

    def __init__(self, artifact: Path, runtime: Any) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3  # as the runtime sets it
        options.intra_op_num_threads = runtime.threads
        self.session = ort.InferenceSession(str(artifact), options, providers=runtime.info()["providers"])
        self.past = {
            item.name: (item.shape[1], item.shape[3], ORT_DTYPES[item.type])
            for item in self.session.get_inputs()
            if item.name.startswith("past_key_values.")
        }
        self.output_names = [item.name for item in self.session.get_outputs()]
        self.cache: dict[str, np.ndarray] = {}

    def _run(self, tokens: list[int], cache: dict[str, np.ndarray]) -> np.ndarray:
        past_length = next(iter(cache.values())).shape[2]
        feed = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, past_length + len(tokens)), dtype=np.int64),
            "position_ids": np.arange(past_length, past_length + len(tokens), dtype=np.int64)[None],
            **cache,
        }
        outputs = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        self.cache = {name.replace("present.", "past_key_values.", 1): outputs[name] for name in self.output_names[1:]}
        return outputs["logits"][0]

    def _empty_cache(self) -> dict[str, np.ndarray]:
        return {name: np.zeros((1, heads, 0, dim), dtype=dtype) for name, (heads, dim, dtype) in self.past.items()}

    def window_logits(self, tokens: list[int]) -> np.ndarray:
        return self._run(tokens, self._empty_cache())

    def prefill(self, tokens: list[int]) -> np.ndarray:
        return self._run(tokens, self._empty_cache())[-1]

    def step(self, token: int) -> np.ndarray:
        return self._run([token], self.cache)[-1]

    def close(self) -> None:
        self.session = None


RAW = {"gguf": RawLlamaCpp, "onnx": RawOrt}


# --- measurements -------------------------------------------------------------------------------------------------


def raw_scoring(raw: Any, windows: np.ndarray) -> float:
    start = time.perf_counter()
    for window in windows:
        raw.window_logits(window.tolist())
    return time.perf_counter() - start


def raw_greedy(raw: Any, prompt: list[int], forced: list[int], max_new_tokens: int) -> int:
    """Decode `forced` after `prompt` with the runtime's decode-call count; returns how many arg-maxes agreed.

    The runtime stops after max_new_tokens without decoding the last token, and at end-of-sequence
    after decoding the last token it returns (then reading the end-of-sequence arg-max).
    """
    stopped_at_eos = len(forced) < max_new_tokens
    logits = raw.prefill(prompt)
    agreed = 0
    for index, token in enumerate(forced):
        agreed += int(np.argmax(logits)) == token
        if index < len(forced) - 1 or stopped_at_eos:
            logits = raw.step(token)
    if stopped_at_eos:
        int(np.argmax(logits))  # the runtime's end-of-sequence check
    return agreed


def raw_generation(
    raw: Any, prompts: Sequence[list[int]], forced: Sequence[list[int]], max_new: int
) -> tuple[float, int]:
    start = time.perf_counter()
    agreed = sum(raw_greedy(raw, prompt, tokens, max_new) for prompt, tokens in zip(prompts, forced, strict=True))
    return time.perf_counter() - start, agreed


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = call()
    return value, time.perf_counter() - start


class StageClock:
    """A ProgressFn that notes when each evaluator stage first reports, to split evaluate()'s wall time."""

    def __init__(self) -> None:
        self.first_call: dict[str, float] = {}

    def __call__(self, description: str, completed: int, total: int) -> None:
        self.first_call.setdefault(description, time.perf_counter())

    def split(self, begin: float, end: float) -> dict[str, float]:
        """Seconds from each stage's first report to the next one's (the last runs to `end`)."""
        starts = sorted(self.first_call.items(), key=lambda item: item[1])
        ends = [moment for _, moment in starts[1:]] + [end]
        split = {"setup": starts[0][1] - begin} if starts else {}
        return split | {name: stop - moment for (name, moment), stop in zip(starts, ends, strict=True)}


@dataclass
class PathTiming:
    """One measured path: the same tokens through the evaluator and through the library directly."""

    tokens: int
    ours: list[float]  # the evaluator's own timing of the runtime calls, per pass
    ours_wall: list[float]  # the whole scoring call, per pass
    raw: list[float]

    def summary(self) -> dict[str, Any]:
        ours, wall, raw = (statistics.median(values) for values in (self.ours, self.ours_wall, self.raw))
        return {
            "tokens": self.tokens,
            "ours_seconds": ours,
            "ours_wall_seconds": wall,
            "raw_seconds": raw,
            "ours_tokens_per_s": self.tokens / ours,
            "ours_wall_tokens_per_s": self.tokens / wall,
            "raw_tokens_per_s": self.tokens / raw,
            "overhead": ours / raw,
            "overhead_wall": wall / raw,
            "passes": {"ours": self.ours, "ours_wall": self.ours_wall, "raw": self.raw},
        }


def measure_runtime(
    fmt: str, artifact: Path, pack: ReferencePack, embedder: Any, repeats: int, device: str, console: Console
) -> dict[str, Any]:
    """Scoring and generation through the evaluators and through the library, then one evaluate()."""
    runtime: Runtime = get_target(fmt).open_runtime(artifact, device=device)
    raw = RAW[fmt](artifact, runtime)
    try:
        windows = pack.distribution.windows
        semantic = pack.semantic
        max_new = semantic.max_new_tokens
        console.print(f"{fmt}: warm-up ({len(windows)} windows, {len(semantic.prompt_tokens)} prompts)")
        runtime.logprobs(windows[0].tolist())
        raw.window_logits(windows[0].tolist())
        forced = [runtime.generate(prompt, max_new) for prompt in semantic.prompt_tokens]
        raw_generation(raw, semantic.prompt_tokens[:1], forced[:1], max_new)

        scoring = PathTiming(int(windows.size), [], [], [])
        generation = PathTiming(sum(map(len, forced)), [], [], [])
        agreed = []
        for index in range(repeats):
            console.print(f"{fmt}: pass {index + 1}/{repeats}")
            (_, timing), wall = timed(lambda: pack.distribution.score(runtime))
            scoring.ours.append(timing["seconds"])
            scoring.ours_wall.append(wall)
            scoring.raw.append(raw_scoring(raw, windows))
            (_, timing), wall = timed(lambda: semantic.score(runtime, embedder, pack.settings.n_worst))
            if timing["tokens"] != generation.tokens:
                raise RuntimeError(f"{fmt}: greedy generation changed between passes; the runtime is not deterministic")
            generation.ours.append(timing["seconds"])
            generation.ours_wall.append(wall)
            seconds, agreement = raw_generation(raw, semantic.prompt_tokens, forced, max_new)
            generation.raw.append(seconds)
            agreed.append(agreement)

        console.print(f"{fmt}: evaluate()")
        clock = StageClock()
        begin = time.perf_counter()
        figures = evaluate(runtime, pack, embedder, clock)
        end = time.perf_counter()
        return {
            "format": fmt,
            "artifact": str(artifact),
            "runtime": runtime.info(),
            "windows": int(windows.shape[0]),
            "window_len": int(windows.shape[1]),
            "prompts": len(semantic.prompt_tokens),
            "max_new_tokens": max_new,
            "scoring": scoring.summary(),
            "generation": generation.summary()
            | {"raw_argmax_agreement": min(agreed) / generation.tokens if generation.tokens else None},
            "evaluate": {"seconds": end - begin, "stages": clock.split(begin, end), "speed": figures["speed"]},
        }
    finally:
        raw.close()
        runtime.close()


# --- report -------------------------------------------------------------------------------------------------------


def throughput_table(results: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="evaluation throughput: the evaluators vs the runtime library on the same tokens")
    for column in ("runtime", "path", "tokens", "ours s", "raw s", "ours tok/s", "raw tok/s", "ours / raw"):
        table.add_column(column, justify="left" if column in ("runtime", "path") else "right")
    for result in results:
        name = result["runtime"].get("runtime", result["format"])
        for path, label in (("scoring", "scoring (prompt)"), ("generation", "generation (greedy)")):
            figures = result[path]
            for suffix, what in (("", "evaluator timing"), ("_wall", "whole score() call")):
                table.add_row(
                    name,
                    f"{label}: {what}",
                    str(figures["tokens"]),
                    f"{figures[f'ours{suffix}_seconds']:.3f}",
                    f"{figures['raw_seconds']:.3f}",
                    f"{figures[f'ours{suffix}_tokens_per_s']:.1f}",
                    f"{figures['raw_tokens_per_s']:.1f}",
                    f"{figures[f'overhead{suffix}']:.3f}",
                )
    return table


def evaluate_table(results: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="srcr.evaluators.reference.evaluate(): wall time by stage (one warm run)")
    table.add_column("runtime")
    table.add_column("total s", justify="right")
    table.add_column("stages (s)")
    table.add_column("prompt tok/s", justify="right")
    table.add_column("generation tok/s", justify="right")
    for result in results:
        run = result["evaluate"]
        stages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["stages"].items())
        speed = run["speed"]
        table.add_row(
            result["runtime"].get("runtime", result["format"]),
            f"{run['seconds']:.2f}",
            stages,
            f"{speed['prompt_tokens_per_s']:.1f}",
            f"{speed['generation_tokens_per_s']:.1f}",
        )
    return table


def run(
    artifacts: dict[str, Path], repeats: int = 3, device: str = "auto", console: Console | None = None
) -> dict[str, Any]:
    """Measure every artifact ({format: path}); the JSON-serializable result."""
    if repeats < 1:
        raise SrcrError(f"--repeats must be at least 1, got {repeats}; pass a positive count")
    console = console or Console(stderr=True)
    packs = {fmt: ReferencePack.load(check_artifact(Path(path), fmt)) for fmt, path in artifacts.items()}
    embedder = load_embedder()
    results = [
        measure_runtime(fmt, Path(path), packs[fmt], embedder, repeats, device, console)
        for fmt, path in artifacts.items()
    ]
    return {"repeats": repeats, "device": device, "torch_threads": torch.get_num_threads(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="an exported .gguf with its reference pack beside it")
    parser.add_argument("--onnx", type=Path, default=None, help="an exported .onnx with its reference pack beside it")
    parser.add_argument("--build", type=Path, default=DEFAULT_BUILD, help="export folder when no artifact is given")
    parser.add_argument("--model", default=None, help="model to export with --build (default: embedded SmolLM2)")
    parser.add_argument("--export-args", default="", help="extra `srcr export` options for --build, one string")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu", "cuda"))
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch threads for the evaluators' KL / top-1 math"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    console = Console(stderr=True, width=140)
    try:
        if args.gguf or args.onnx:
            artifacts = {fmt: path for fmt, path in (("gguf", args.gguf), ("onnx", args.onnx)) if path}
        else:
            artifacts = build_artifacts(args.build, args.model, shlex.split(args.export_args), console)
        result = run(artifacts, args.repeats, args.device, console)
    except SrcrError as error:
        console.print(f"[red]error:[/red] {error}")
        raise SystemExit(2) from None
    console.print(throughput_table(result["results"]))
    console.print(evaluate_table(result["results"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
