"""bench/bench_eval_throughput.py on a tiny Llama: the evaluators and the raw libraries see the same tokens."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import typer

pytest.importorskip("llama_cpp")
pytest.importorskip("onnxruntime")

from conftest import make_tiny_llama  # noqa: E402

from srcr.evaluators.embedder import load_embedder  # noqa: E402
from srcr.evaluators.reference import EvalSettings, build_reference_pack  # noqa: E402
from srcr.exporter.calibration import evaluation_text  # noqa: E402
from srcr.exporter.cli import app  # noqa: E402
from srcr.targets.registry import get_target  # noqa: E402
from srcr.targets.torch_runtime import TorchRuntime  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_eval_throughput.py"
PROMPTS = [{"id": "paris", "prompt": "The capital of France is"}, {"id": "colours", "prompt": "Name three colours."}]
# Unquantized formats keep the exports to seconds; the measured paths are the same for every bit-width.
FORMATS = {"gguf": 16, "onnx": 32}


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_eval_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


@pytest.fixture(scope="module")
def artifacts(smollm_tokenizer, tmp_path_factory):
    """A tiny model in both formats, each with the `<name>.reference.npz` the bench reads beside it."""
    folder = tmp_path_factory.mktemp("throughput")
    model = make_tiny_llama(smollm_tokenizer)
    settings = EvalSettings(windows=2, window_len=64, top_k=8, max_new_tokens=4, n_last_word=0)
    base = TorchRuntime(model, smollm_tokenizer)
    eval_text = evaluation_text(None, None).text
    pack = build_reference_pack(base, settings, eval_text, PROMPTS, None, load_embedder())
    paths = {}
    for fmt, bits in FORMATS.items():
        target = get_target(fmt)
        paths[fmt] = folder / f"tiny-{fmt}{target.suffix}"
        target.export(model, smollm_tokenizer, target.resolve_quant(bits, None, {}), paths[fmt])
        pack.save(folder / f"tiny-{fmt}.reference.npz")
    return paths


def test_ours_and_raw_measure_the_same_tokens(bench, artifacts):
    result = bench.run(artifacts, repeats=1, device="cpu")
    assert [entry["format"] for entry in result["results"]] == ["gguf", "onnx"]
    for entry in result["results"]:
        scoring, generation = entry["scoring"], entry["generation"]
        assert scoring["tokens"] == 2 * 64
        assert 0 < generation["tokens"] <= len(PROMPTS) * 4
        # The raw greedy loop's own arg-max reproduces every token the runtime generated.
        assert generation["raw_argmax_agreement"] == 1.0
        for figures in (scoring, generation):
            assert figures["ours_seconds"] > 0 and figures["raw_seconds"] > 0
            assert figures["overhead"] == pytest.approx(figures["ours_seconds"] / figures["raw_seconds"])
            assert figures["ours_wall_seconds"] >= figures["ours_seconds"]
        stages = entry["evaluate"]["stages"]
        assert {"perplexity windows", "generations"} <= set(stages)
        assert sum(stages.values()) == pytest.approx(entry["evaluate"]["seconds"])


def test_missing_pack_is_a_one_line_error(bench, tmp_path):
    from srcr.base.errors import SrcrError

    artifact = tmp_path / "lonely.gguf"
    artifact.write_bytes(b"GGUF")
    with pytest.raises(SrcrError, match="lonely.reference.npz is missing"):
        bench.check_artifact(artifact, "gguf")


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_build_step_is_a_valid_srcr_export_command(bench, fmt, tmp_path):
    command = bench.export_command(fmt, tmp_path, f"dense-q4-{fmt}", None, ["--calib-samples", "16"])
    assert command[3] == "export"
    export = typer.main.get_command(app).commands["export"]
    params = export.make_context("export", command[4:]).params  # parses the options without running them
    assert (params["fmt"], params["bits"], params["sparsity"], params["evaluate"]) == (fmt, 4, 0.0, True)
    assert params["out"] == tmp_path and params["calib_samples"] == 16
