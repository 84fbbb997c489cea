"""--budget-mb / --budget-bpw for ONNX: the weights each MatMulNBits option stores, the allocation, the graph."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from test_gguf_helpers import tiny_llama
from typer.testing import CliRunner

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from srcr.base.errors import SrcrError  # noqa: E402
from srcr.exporter.cli import app  # noqa: E402
from srcr.targets.onnx.budget import candidates, config_of, label, stored_weight  # noqa: E402
from srcr.targets.onnx.graph import WeightMap  # noqa: E402
from srcr.targets.onnx.matmul_nbits import BlockQuantConfig  # noqa: E402
from srcr.targets.onnx.target import ONNXTarget  # noqa: E402

runner = CliRunner()


def _one_matmul_graph(weight: np.ndarray):
    """y = x @ W^T: one MatMul by `weight` [out, in], stored [in, out] as the exporter folds nn.Linear."""
    from onnx import TensorProto, helper, numpy_helper

    out_features, in_features = weight.shape
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="/layer/MatMul")
    graph = helper.make_graph(
        [node],
        "one-matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", out_features])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    return model, WeightMap(linear={"w": "/layer/MatMul"}, embedding=None, lm_head=None, tied=False)


@pytest.mark.parametrize(("bits", "block"), [(2, 32), (2, 128), (4, 64), (8, 32), (8, 128)])
@pytest.mark.parametrize("kind", ["plain", "imatrix", "tiny"])
def test_stored_weight_is_what_onnx_runtime_multiplies_by(tmp_path, bits, block, kind):
    """The allocator's view of an option (values and bytes) against the written graph run in ONNX Runtime."""
    from srcr.targets.onnx.artifact import tensor_bytes, weight_tensor_bytes
    from srcr.targets.onnx.quantize import quantize_graph

    generator = np.random.default_rng(bits * block)
    weight = generator.standard_normal((96, 256)).astype(np.float32)
    importance = generator.random(256).astype(np.float32) if kind == "imatrix" else None
    if kind == "tiny":  # scales below fp16's range: stored fp32, 4 bytes each
        weight *= 1e-6
    config = BlockQuantConfig(bits, block, "wls", symmetric=False)
    expected, expected_bytes = stored_weight(weight, config, importance)

    model, weights = _one_matmul_graph(weight)
    spec = ONNXTarget().resolve_quant(None, None, {"budget_mb": 1.0})
    quantized = quantize_graph(model, weights, spec, tmp_path, {"w": importance} if importance is not None else {},
                               per_weight={"w": config})  # fmt: skip
    session = onnxruntime.InferenceSession(quantized.model.SerializeToString(), providers=["CPUExecutionProvider"])
    (computed,) = session.run(["y"], {"x": np.eye(256, dtype=np.float32)})
    assert np.isfinite(computed).all()
    np.testing.assert_allclose(computed.T, expected, rtol=1e-5, atol=1e-5 * float(np.abs(weight).max()))
    # and it is the weight, to the grid's resolution (a scale flushed to zero would make it nan)
    np.testing.assert_allclose(expected, weight, atol=float(np.abs(weight).max()) * 2 ** (2 - bits))
    assert weight_tensor_bytes(tensor_bytes(quantized.model), ["w"]) == expected_bytes


def test_an_option_label_names_its_config_and_foreign_labels_are_refused():
    for config in candidates(256):
        assert config_of(label(config)) == config
    assert {(c.bits, c.block_size) for c in candidates(96)} == {(2, 32), (4, 32), (8, 32)}
    for foreign in ("MatMulNBits-q3-wls-b32", "MatMulNBits-q4-wls-b16", "Q4_K", "MatMulNBits-q4-hqq-b32"):
        with pytest.raises(SrcrError, match="not a MatMulNBits option"):
            config_of(foreign)


@pytest.mark.parametrize(
    ("bits", "quant_type", "options", "fragment"),
    [
        (4, None, {"budget_mb": 10.0}, "drop --bits"),
        (None, "MatMulNBits-q4-wls-b32", {"budget_mb": 10.0}, "drop --bits"),
        (None, None, {"budget_mb": 10.0, "budget_bpw": 4.0}, "not both"),
        (None, None, {"budget_bpw": 2.0}, "2.25 to 9 bits"),
        (None, None, {"budget_mb": 0.0}, "must be positive"),
        (None, None, {"budget_mb": 10.0, "quantizer": "gptq"}, "drop --quantizer"),
        (None, None, {"budget_mb": 10.0, "quant_block_size": 64}, "drop --quant-block-size"),
        (None, None, {"budget_mb": 10.0, "quant_algo": "hqq"}, "drop --quant-algo"),
        (None, None, {"budget_mb": 10.0, "quant_scheme": "dynamic"}, "drop --quant-scheme"),
    ],
)
def test_onnx_budget_requests_that_contradict_themselves_are_refused(bits, quant_type, options, fragment):
    with pytest.raises(SrcrError, match=fragment):
        ONNXTarget().resolve_quant(bits, quant_type, options)


def test_a_budget_with_the_default_quantizer_and_algorithm_named_is_accepted():
    spec = ONNXTarget().resolve_quant(None, None, {"budget_bpw": 4.5, "quantizer": "ort", "quant_algo": "wls"})
    assert spec.allocates and spec.quant_type == "budget-4.5bpw"


@pytest.fixture(scope="module", params=["tied", "untied"])
def budget_model_dir(request, tmp_path_factory, small_vocab_tokenizer):
    """A saved 256-wide random Llama with a 1,200-token vocabulary, its embedding tied or not."""
    folder = tmp_path_factory.mktemp(f"onnx-budget-{request.param}")
    model = tiny_llama(small_vocab_tokenizer, hidden=256, intermediate=512, tie_word_embeddings=request.param == "tied")
    model.save_pretrained(folder, safe_serialization=True)
    small_vocab_tokenizer.save_pretrained(folder)
    return folder


def _export(model_dir, out, *flags):
    args = ["export", "--model", str(model_dir), "--format", "onnx", "--calib-samples", "2", "--seq-len", "64"]
    return runner.invoke(app, [*args, "--no-eval", "--out", str(out), "--json", *flags])


def _written_options(path) -> dict[str, str]:
    """{weight: option label} read off the graph's MatMulNBits nodes (their packed input names the weight)."""
    written = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {attribute.name: attribute.i for attribute in node.attribute}
            weight = node.input[1].rsplit(".q", 1)[0]
            written[weight] = f"MatMulNBits-q{attributes['bits']}-wls-b{attributes['block_size']}"
    return written


def test_onnx_budget_export_fits_and_writes_what_it_chose(budget_model_dir, tmp_path):
    uniform = _export(budget_model_dir, tmp_path / "uniform", "--bits", "4")
    assert uniform.exit_code == 0, uniform.output
    uniform_bytes = json.loads(uniform.stdout)["artifact"]["bytes"]
    manifests = {}
    for name, budget in (("tight", uniform_bytes * 0.8), ("uniform", uniform_bytes)):
        result = _export(budget_model_dir, tmp_path / name, "--budget-mb", f"{budget / 1e6:.6f}")
        assert result.exit_code == 0, result.output
        manifest = json.loads(result.stdout)
        path = tmp_path / name / manifest["artifact"]["file"]
        assert path.stat().st_size == manifest["artifact"]["bytes"] <= budget
        allocation = manifest["quantization"]["allocation"]
        assert _written_options(path) == allocation["tensors"]
        assert manifest["quantization"]["type"].startswith("budget-")
        manifests[name] = manifest
        runtime = ONNXTarget().open_runtime(path, device="cpu")
        try:
            logprobs = runtime.logprobs(np.arange(1, 33))
        finally:
            runtime.close()
        assert np.isfinite(logprobs).all()
    tight, loose = (manifests[k]["quantization"]["allocation"] for k in ("tight", "uniform"))
    assert tight["predicted_kl"] > loose["predicted_kl"]
    assert len(Counter(tight["tensors"].values())) > 1  # a mix, not one option everywhere


def test_budget_check_keeps_the_candidate_of_least_measured_kl_and_writes_it(budget_model_dir, tmp_path):
    """--budget-check: the additive mix and its alternatives are measured, the least kept and written; without
    the flag the additive mix stands unmeasured (its tensors are what the checked run calls additive)."""
    checked_run = _export(budget_model_dir, tmp_path / "checked", "--budget-bpw", "3.5", "--budget-check")
    plain_run = _export(budget_model_dir, tmp_path / "plain", "--budget-bpw", "3.5")
    assert checked_run.exit_code == 0 and plain_run.exit_code == 0, checked_run.output + plain_run.output
    checked, plain = (json.loads(run.stdout) for run in (checked_run, plain_run))
    allocation = checked["quantization"]["allocation"]
    figures = [entry["measured_kl"] for entry in allocation["checked"]]
    assert len(figures) > 1 and allocation["measured_kl"] == figures[0] == min(figures)
    assert allocation["chosen"] == allocation["checked"][0]["candidate"]
    assert "additive" in {entry["candidate"] for entry in allocation["checked"]}
    path = tmp_path / "checked" / checked["artifact"]["file"]
    assert _written_options(path) == allocation["tensors"]
    assert checked["artifact"]["bytes"] <= allocation["budget_bytes"]
    assert plain["quantization"]["allocation"]["chosen"] == "additive"
    assert plain["quantization"]["allocation"]["checked"] == []
    if allocation["chosen"] == "additive":
        assert allocation["tensors"] == plain["quantization"]["allocation"]["tensors"]
    assert checked["recipe"]["quantize"]["budget_check"] is True


def test_onnx_budget_bpw_bounds_the_measured_bits_per_weight(budget_model_dir, tmp_path):
    result = _export(budget_model_dir, tmp_path, "--budget-bpw", "4.25")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert 3.5 < manifest["artifact"]["bits_per_weight"] <= 4.25


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--budget-mb", "0.1"], "no ONNX graph of this model fits 0.10 MB"),
        (["--budget-mb", "2", "--quant-block-size", "64"], "drop --quant-block-size"),
        (["--budget-bpw", "9.5"], "2.25 to 9 bits"),
        (["--bits", "4", "--budget-check"], "add --budget-mb or --budget-bpw"),
    ],
)
def test_onnx_budget_errors_are_one_line_and_leave_nothing(budget_model_dir, tmp_path, flags, fragment):
    out = tmp_path / "out"
    result = _export(budget_model_dir, out, *flags)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in " ".join(result.output.split())
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]
