"""End to end through the CLI: export → manifest → verify → tamper → compare, on real runtimes.

The fast test uses a tiny random Llama with SmolLM2's real tokenizer; the slow one the embedded
SmolLM2-135M-Instruct itself, as a user would run it (with fewer calibration samples to fit CI).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from srcr.exporter.cli import app
from srcr.targets.gguf.backends import plan_cpu_buffers
from srcr.targets.gguf.runtime import LlamaCppRuntime

runner = CliRunner()
PROMPTS = str(Path(__file__).parent / "data" / "prompts_small.jsonl")
# Small evaluation settings keep the tiny-model tests quick; the evaluators are the same code.
FAST_EVAL = (
    "--eval-windows", "2", "--last-word-items", "10", "--new-tokens", "8",
    "--no-builtin-prompts", "--prompts", PROMPTS,
)  # fmt: skip


def export(*args):
    result = runner.invoke(app, ["export", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("export")
    manifest = export(
        "--model",
        str(tiny_llama_dir),
        "--method",
        "wanda",
        "--sparsity",
        "0.5",
        "--bits",
        "8",
        "--calib-samples",
        "4",
        "--seq-len",
        "64",
        *FAST_EVAL,
        "--out",
        str(out),
        "--name",
        "tiny",
    )
    return out, manifest


def test_export_writes_artifact_pack_and_manifest(tiny_export):
    out, manifest = tiny_export
    assert sorted(p.name for p in out.iterdir()) == ["tiny.gguf", "tiny.manifest.json", "tiny.reference.npz"]
    assert json.loads((out / "tiny.manifest.json").read_text()) == manifest
    assert manifest["artifact"]["sha256"] == sha256(out / "tiny.gguf")
    assert manifest["artifact"]["bytes"] == (out / "tiny.gguf").stat().st_size
    assert manifest["pruning"]["method"] == "wanda"
    assert manifest["pruning"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert manifest["compression"]["tcr"] == pytest.approx(1 - 8 / 16 * 0.5)
    assert manifest["srcr"] == pytest.approx(manifest["sr"] * manifest["compression"]["tcr"])
    assert manifest["srcr_definition"] == "Sr*TCr/v1"
    evaluation = manifest["evaluation"]
    assert manifest["sr"] == evaluation["sr"]
    # Sr recomputed from the manifest's own figures: the random model's last words are never right
    # (no signal), so Sr is the mean of the perplexity and semantic retentions.
    assert evaluation["last_word"]["base_acc"] == 0.0 and evaluation["retention"]["last_word"] is None
    perplexity = evaluation["perplexity"]
    retentions = [min(1.0, perplexity["base"] / perplexity["compressed"]), min(1.0, evaluation["semantic"]["mean"])]
    assert manifest["sr"] == pytest.approx(sum(retentions) / 2, rel=1e-12)
    # Measured: Sr 0.99934, mean KL 1.2e-6, top-1 agreement 1.0. The layers of this tiny random model
    # add little to its output, so pruning half of them costs it 0.13% in perplexity; Sr < 1 shows that
    # the pruned artifact, not the base model, was scored.
    assert 0.95 < manifest["sr"] < 1.0
    assert evaluation["retention"]["perplexity"] < 1.0
    assert 0 < evaluation["kld"]["mean"] < 1e-3
    assert list(manifest["timings_s"]) == ["load", "reference", "calibrate_prune", "convert", "quantize", "evaluate"]
    assert all(seconds >= 0 for seconds in manifest["timings_s"].values())


def test_existing_outputs_are_not_overwritten(tiny_export, tiny_llama_dir):
    out, manifest = tiny_export
    before = sha256(out / "tiny.gguf")
    result = runner.invoke(
        app,
        ["export", "--model", str(tiny_llama_dir), "--bits", "4", "--out", str(out), "--name", "tiny", "--no-eval"],
    )
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert sha256(out / "tiny.gguf") == before
    assert sorted(p.name for p in out.iterdir()) == ["tiny.gguf", "tiny.manifest.json", "tiny.reference.npz"]


def test_verify_passes_then_fails_on_one_changed_byte(tiny_export, tmp_path):
    out, manifest = tiny_export
    result = runner.invoke(app, ["verify", str(out / "tiny.manifest.json")])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for file in out.iterdir():
        (tampered / file.name).write_bytes(file.read_bytes())
    data = bytearray((tampered / "tiny.gguf").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tampered / "tiny.gguf").write_bytes(bytes(data))
    result = runner.invoke(app, ["verify", str(tampered / "tiny.manifest.json")])
    assert result.exit_code != 0
    assert "sha256" in result.output and "Traceback" not in result.output


def test_compare_lists_base_first_and_exports_csv(tiny_export):
    out, manifest = tiny_export
    result = runner.invoke(app, ["compare", str(out / "tiny.manifest.json"), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["name"].startswith("base:") and rows[0]["sr"] == 1.0
    assert rows[1]["name"] == "tiny" and rows[1]["srcr"] == pytest.approx(manifest["srcr"])
    csv_result = runner.invoke(app, ["compare", str(out / "tiny.manifest.json"), "--csv"])
    assert csv_result.stdout.splitlines()[0].startswith("name,format,method")


@pytest.mark.slow
def test_default_model_export_runs_in_llama_cpp(tmp_path):
    """The README's main job on the embedded SmolLM2 (calibration trimmed to fit CI)."""
    import llama_cpp

    manifest = export(
        "--sparsity",
        "0.25",
        "--bits",
        "4",
        "--format",
        "gguf",
        "--calib-samples",
        "8",
        "--seq-len",
        "512",
        "--out",
        str(tmp_path),
    )
    artifact = tmp_path / manifest["artifact"]["file"]
    assert manifest["source_model"]["id"] == "SmolLM2-135M-Instruct"
    assert manifest["quantization"]["type"] == "Q4_K_M"
    assert manifest["pruning"]["achieved_sparsity"] == pytest.approx(0.25, abs=1e-4)
    assert manifest["compression"]["tcr"] == pytest.approx(0.8125)
    # A lightly compressed real model keeps most of its meaning.
    assert manifest["sr"] > 0.6
    assert manifest["evaluation"]["top1_agreement"] > 0.5

    # Stock llama-cpp-python loads it too, unless its CPU backend offers AMX: there the stock loader's
    # extra buffer types take llama.cpp's crashing AMX path, so srcr's runtime (which turns them off) runs it.
    if plan_cpu_buffers().use_extra_buffers:
        llm = llama_cpp.Llama(model_path=str(artifact), n_ctx=256, verbose=False)
        text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    else:
        runtime = LlamaCppRuntime(artifact, n_ctx=256)
        try:
            text = runtime.detokenize(runtime.generate(runtime.tokenize("The capital of France is"), 8))
        finally:
            runtime.close()
    assert text.strip()

    result = runner.invoke(app, ["verify", str(tmp_path / f"{manifest['name']}.manifest.json")])
    assert result.exit_code == 0, result.output


def test_onnx_export_verifies_and_compares_beside_gguf(tiny_export, tiny_llama_dir):
    out, gguf_manifest = tiny_export
    onnx_out = out.parent / "onnx"
    manifest = export(
        "--model", str(tiny_llama_dir), "--method", "wanda", "--sparsity", "0.5", "--bits", "8",
        "--format", "onnx", "--calib-samples", "4", "--seq-len", "64", *FAST_EVAL,
        "--out", str(onnx_out), "--name", "tiny",
    )  # fmt: skip
    assert manifest["format"] == "onnx"
    assert manifest["evaluation"]["runtime"]["providers"][-1] == "CPUExecutionProvider"
    assert sorted(p.name for p in onnx_out.iterdir()) == ["tiny.manifest.json", "tiny.onnx", "tiny.reference.npz"]
    result = runner.invoke(app, ["verify", str(onnx_out / "tiny.manifest.json")])
    assert result.exit_code == 0, result.output

    result = runner.invoke(
        app, ["compare", str(out / "tiny.manifest.json"), str(onnx_out / "tiny.manifest.json"), "--json"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["format"] for row in rows[1:]] == ["gguf", "onnx"]
    assert rows[1]["tcr"] == rows[2]["tcr"] == pytest.approx(0.75)


def test_compare_tells_a_paired_difference_from_a_tie(tiny_export, tmp_path):
    """Two manifests on one reference pack: a copy whose generations are all a little less similar is
    worse by a difference whose paired interval excludes zero; an identical copy ties."""
    from srcr.evaluators.uncertainty import ItemScores

    out, manifest = tiny_export
    assert (
        manifest["evaluation"]["intervals"]["sr"][0] <= manifest["sr"] <= manifest["evaluation"]["intervals"]["sr"][1]
    )
    worse = json.loads(json.dumps(manifest))
    worse["name"] = "worse"
    items = worse["evaluation"]["items"]
    items["similarity"] = [max(-1.0, value - 0.05) for value in items["similarity"]]
    worse["sr"] = ItemScores.from_dict(items).figures()["sr"]
    same = {**json.loads(json.dumps(manifest)), "name": "same"}
    paths = []
    for data in (manifest, worse, same):
        path = tmp_path / f"{data['name']}.manifest.json"
        path.write_text(json.dumps(data))
        paths.append(str(path))
    result = runner.invoke(app, ["compare", *paths, "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)[1:]}
    assert rows["worse"]["sr_vs_best"]["significant"] and rows["worse"]["sr_vs_best"]["high"] < 0
    best = next(name for name in ("tiny", "same") if rows[name]["sr_vs_best"]["best"])
    other = "same" if best == "tiny" else "tiny"
    assert rows[other]["sr_vs_best"]["value"] == 0.0 and not rows[other]["sr_vs_best"]["significant"]
    assert rows["tiny"]["sr_interval"] == manifest["evaluation"]["intervals"]["sr"]
    table = runner.invoke(app, ["compare", *paths])
    assert "Sr vs best" in table.stdout and "tie" in table.stdout
