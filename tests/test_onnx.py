"""The ONNX target on tiny random Llamas (SmolLM2's tokenizer): parity, quantization, layout, bad input."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama

from srcr.base.errors import SrcrError
from srcr.base.runtime import Runtime
from srcr.targets.onnx.target import ONNXTarget

TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest."
# Wider than the default init so that logits are peaked and quantization error shows up in the KL.
INIT_RANGE = 0.2


@pytest.fixture(scope="module")
def target() -> ONNXTarget:
    return ONNXTarget()


@pytest.fixture(scope="module")
def tiny_model(smollm_tokenizer):
    return make_tiny_llama(smollm_tokenizer, initializer_range=INIT_RANGE)


@pytest.fixture(scope="module")
def tokens(smollm_tokenizer) -> list[int]:
    return smollm_tokenizer(TEXT, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def torch_logprobs(tiny_model, tokens) -> np.ndarray:
    with torch.no_grad():
        logits = tiny_model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def export(target, model, tokenizer, folder, bits=None, quant_type=None, **options):
    spec = target.resolve_quant(bits, quant_type, options)
    out = folder / f"{spec.quant_type}.onnx"
    return target.export(model, tokenizer, spec, out)


def mean_kl(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float((np.exp(reference) * (reference - candidate.astype(np.float64))).sum(-1).mean())


@pytest.fixture(scope="module")
def fp32_artifact(target, tiny_model, smollm_tokenizer, tmp_path_factory):
    return export(target, tiny_model, smollm_tokenizer, tmp_path_factory.mktemp("fp32"), bits=32)


def test_fp32_logprobs_match_pytorch(target, fp32_artifact, tokens, torch_logprobs):
    runtime = target.open_runtime(fp32_artifact.artifact, device="cpu")
    try:
        served = runtime.logprobs(tokens)
    finally:
        runtime.close()
    assert served.dtype == np.float32 and served.shape == torch_logprobs.shape
    assert np.abs(served - torch_logprobs).max() < 1e-4
    assert mean_kl(torch_logprobs, served) < 1e-7


def test_greedy_generation_with_cache_matches_transformers(target, fp32_artifact, tiny_model, tokens):
    with torch.no_grad():
        output = tiny_model.generate(torch.tensor([tokens]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    expected = output[0, len(tokens) :].tolist()
    eos = tiny_model.generation_config.eos_token_id
    if eos in expected:  # transformers keeps the end-of-sequence token; srcr's runtimes end before it
        expected = expected[: expected.index(eos)]
    runtime = target.open_runtime(fp32_artifact.artifact, device="cpu")
    try:
        assert runtime.generate(tokens, 16) == expected
    finally:
        runtime.close()


def test_generation_stops_before_end_of_sequence(target, smollm_tokenizer, tokens, tmp_path):
    model = make_tiny_llama(smollm_tokenizer, seed=1, initializer_range=INIT_RANGE)
    with torch.no_grad():
        greedy = model.generate(torch.tensor([tokens]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    first_new, second_new = greedy[0, len(tokens) :].tolist()
    model.generation_config.eos_token_id = second_new  # the model's own second greedy token ends the reply
    result = export(target, model, smollm_tokenizer, tmp_path, bits=32)
    runtime = target.open_runtime(result.artifact, device="cpu")
    try:
        assert runtime.generate(tokens, 8) == ([] if first_new == second_new else [first_new])
    finally:
        runtime.close()


def test_runtime_tokenizes_like_transformers_and_reports_what_ran(target, fp32_artifact, smollm_tokenizer):
    runtime = target.open_runtime(fp32_artifact.artifact, device="auto")
    try:
        assert isinstance(runtime, Runtime)
        text = TEXT + " Ünïcödé <|im_end|> 12345"
        ids = smollm_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert runtime.tokenize(text) == ids
        assert runtime.detokenize(ids) == smollm_tokenizer.decode(ids, skip_special_tokens=True)
        info = runtime.info()
    finally:
        runtime.close()
    import onnxruntime

    assert info["runtime"] == "onnxruntime" and info["version"] == onnxruntime.__version__
    assert info["opset"] == 17
    assert "CPUExecutionProvider" in info["providers"]
    assert info["device"] == ("cuda" if "CUDAExecutionProvider" in info["providers"] else "cpu")


def test_wls_reproduces_weights_already_on_a_block_grid():
    """Q4_1-style blocks (d * q + m, all 16 levels used) come back exactly; other weights do not."""
    from srcr.targets.onnx.matmul_nbits import wls_blocks

    rng = np.random.default_rng(0)
    rows, cols, block = 8, 64, 32
    levels = rng.integers(0, 16, (rows, cols // block, block))
    levels[..., 0], levels[..., 1] = 0, 15
    d = rng.uniform(0.01, 0.1, (rows, cols // block, 1)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.5, 0.0, (rows, cols // block, 1)).astype(np.float16).astype(np.float32)
    grid = (d * levels + m).reshape(rows, cols)
    q, scales, zeros = wls_blocks(grid, 4, block)
    rebuilt = ((q.reshape(levels.shape) - zeros[..., None]) * scales[..., None]).reshape(rows, cols)
    np.testing.assert_allclose(rebuilt, grid, atol=1e-6)

    gaussian = rng.standard_normal((rows, cols)).astype(np.float32)
    plain = wls_blocks(gaussian, 4, block)
    weighted = wls_blocks(gaussian, 4, block, column_importance=rng.uniform(0.1, 10, cols).astype(np.float32))
    for q, scales, zeros in (plain, weighted):
        rebuilt = ((q.reshape(rows, -1, block) - zeros[..., None]) * scales[..., None]).reshape(rows, cols)
        assert 0 < np.abs(rebuilt - gaussian).max() < 0.6 * (gaussian.max() - gaussian.min()) / 15


def test_fp32_stores_the_tied_embedding_once(fp32_artifact, tiny_model):
    config = tiny_model.config
    embedding_bytes = 4 * config.vocab_size * config.hidden_size
    by_kind = fp32_artifact.quantization["bytes_by_kind"]
    assert by_kind["embedding"] == embedding_bytes
    assert sum(by_kind.values()) == fp32_artifact.artifact_bytes
    assert fp32_artifact.quantization["embedding_shared_with_lm_head"] is True
    assert fp32_artifact.bits_per_weight == pytest.approx(32.0)
    assert fp32_artifact.artifact_bytes > 4 * sum(p.numel() for p in tiny_model.parameters())
    assert fp32_artifact.format_info["exporter"].startswith("torch.onnx legacy")


def test_fp16_halves_the_weights_and_stays_close(
    target, tiny_model, smollm_tokenizer, tokens, torch_logprobs, tmp_path
):
    result = export(target, tiny_model, smollm_tokenizer, tmp_path, bits=16)
    runtime = target.open_runtime(result.artifact, device="cpu")
    try:
        kl = mean_kl(torch_logprobs, runtime.logprobs(tokens))
    finally:
        runtime.close()
    assert result.bits_per_weight == pytest.approx(16.0)
    assert kl < 1e-4


def test_kl_grows_as_bits_drop(target, tiny_model, smollm_tokenizer, tokens, torch_logprobs, tmp_path):
    figures = {}
    for bits in (8, 4, 2):
        result = export(target, tiny_model, smollm_tokenizer, tmp_path, bits=bits)
        runtime = target.open_runtime(result.artifact, device="cpu")
        try:
            figures[bits] = (mean_kl(torch_logprobs, runtime.logprobs(tokens)), result)
        finally:
            runtime.close()
    (kl8, r8), (kl4, r4), (kl2, r2) = figures[8], figures[4], figures[2]
    assert kl8 < 5e-3
    assert kl8 < kl4 < kl2
    assert r8.artifact_bytes > r4.artifact_bytes > r2.artifact_bytes
    for bits, (_, result) in figures.items():
        # levels + fp16 scale and fp16 offset per 32-weight block
        assert result.bits_per_weight == pytest.approx(bits + 1.0, abs=0.01)
        assert result.quantization["embedding_quantized"] is True
        assert result.quantization["bits"] == bits and result.quantization["block_size"] == 32


@pytest.mark.parametrize(("algo", "options"), [("rtn", {}), ("rtn", {"symmetric": True}), ("hqq", {}), ("dynamic", {})])
def test_other_algorithms_run_and_stay_close(
    target, tiny_model, smollm_tokenizer, tokens, torch_logprobs, tmp_path, algo, options
):
    if algo == "dynamic":
        result = export(target, tiny_model, smollm_tokenizer, tmp_path, bits=8, quant_scheme="dynamic")
        bound = 0.05
    else:
        result = export(target, tiny_model, smollm_tokenizer, tmp_path, bits=4, quant_algo=algo, **options)
        bound = 1.0
    runtime = target.open_runtime(result.artifact, device="cpu")
    try:
        kl = mean_kl(torch_logprobs, runtime.logprobs(tokens))
        assert len(runtime.generate(tokens, 4)) == 4
    finally:
        runtime.close()
    assert 0 < kl < bound
    assert result.quantization["embedding_quantized"] is True
    assert sum(result.quantization["bytes_by_kind"].values()) == result.artifact_bytes


def test_imatrix_weighs_the_wls_search(target, tiny_model, smollm_tokenizer, tokens, torch_logprobs, tmp_path):
    imatrix = {
        f"{name}.weight": np.random.default_rng(0).uniform(0.1, 2.0, module.in_features).astype(np.float32)
        for name, module in tiny_model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    }
    spec = target.resolve_quant(4, None, {})
    result = target.export(tiny_model, smollm_tokenizer, spec, tmp_path / "m.onnx", imatrix=imatrix)
    runtime = target.open_runtime(result.artifact, device="cpu")
    try:
        assert mean_kl(torch_logprobs, runtime.logprobs(tokens)) < 1.0
    finally:
        runtime.close()
    assert result.quantization["imatrix_used"] is True
    wrong = {name: values[:-1] for name, values in imatrix.items()}
    with pytest.raises(ValueError, match="imatrix entry"):
        target.export(tiny_model, smollm_tokenizer, spec, tmp_path / "bad.onnx", imatrix=wrong)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.onnx"]


def _tied_head_graph(vocab: int, hidden: int, seed: int):
    """A two-node graph shaped like the exporter's: embedding Gather and lm_head MatMul on one tied matrix."""
    from onnx import TensorProto, helper, numpy_helper

    from srcr.targets.onnx.graph import WeightMap

    weight = np.random.default_rng(seed).standard_normal((hidden, vocab)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["model.embed_tokens.weight", "ids"], ["rows"], name="/decoder/embed/Gather"),
            helper.make_node("MatMul", ["x", "lm_head.weight"], ["logits"], name="/decoder/lm_head/MatMul"),
        ],
        "tied",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "n"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "m", hidden]),
        ],
        [
            helper.make_tensor_value_info("rows", TensorProto.FLOAT, [1, "n", hidden]),
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "m", vocab]),
        ],
        [
            numpy_helper.from_array(weight.T.copy(), "model.embed_tokens.weight"),
            numpy_helper.from_array(weight, "lm_head.weight"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    weights = WeightMap(
        linear={"lm_head.weight": "/decoder/lm_head/MatMul"},
        embedding="model.embed_tokens.weight",
        lm_head="lm_head.weight",
        tied=True,
    )
    return model, weights


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("algo", "symmetric"), [("wls", False), ("hqq", False), ("rtn", False), ("rtn", True)])
def test_shared_quantized_embedding_rows_equal_the_lm_head_weight(target, tmp_path, bits, algo, symmetric):
    """The embedding lookup must dequantize exactly what MatMulNBits multiplies by (layout check)."""
    import onnxruntime

    from srcr.targets.onnx.quantize import quantize_graph

    vocab, hidden = 96, 64
    model, weights = _tied_head_graph(vocab, hidden, seed=bits)
    spec = target.resolve_quant(bits, None, {"quant_algo": algo, "symmetric": symmetric, "quant_block_size": 16})
    quantized = quantize_graph(model, weights, spec, tmp_path)
    assert quantized.embedding_shared and quantized.embedding_quantized
    stored = {tensor.name for tensor in quantized.model.graph.initializer}
    assert "model.embed_tokens.weight" not in stored and "lm_head.weight" not in stored
    session = onnxruntime.InferenceSession(quantized.model.SerializeToString(), providers=["CPUExecutionProvider"])
    identity = np.eye(hidden, dtype=np.float32)[None]
    rows, logits = session.run(["rows", "logits"], {"ids": np.arange(vocab)[None], "x": identity})
    np.testing.assert_allclose(rows[0], logits[0].T, rtol=1e-5, atol=1e-6)


def test_external_data_beside_the_artifact_when_large(
    target, tiny_model, smollm_tokenizer, tokens, fp32_artifact, monkeypatch, tmp_path
):
    from srcr.targets.onnx import artifact

    monkeypatch.setattr(artifact, "EXTERNAL_DATA_THRESHOLD", 0)
    spec = target.resolve_quant(32, None, {})
    out = tmp_path / "tiny.onnx"
    result = target.export(tiny_model, smollm_tokenizer, spec, out, hints={"artifact_name": "final.onnx"})
    data = tmp_path / "final.onnx.data"
    assert result.format_info["external_data"] == "final.onnx.data" and data.is_file()
    assert result.artifact_bytes == out.stat().st_size + data.stat().st_size
    assert out.stat().st_size < data.stat().st_size
    single = target.open_runtime(fp32_artifact.artifact, device="cpu")
    split = target.open_runtime(out.rename(tmp_path / "final.onnx"), device="cpu")
    try:
        np.testing.assert_array_equal(split.logprobs(tokens), single.logprobs(tokens))
    finally:
        single.close()
        split.close()


def test_three_bits_is_refused_with_one_line(target):
    with pytest.raises(SrcrError, match="no 3-bit") as error:
        target.resolve_quant(3, None, {})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("bits", "options", "message"),
    [
        (4, {"quant_block_size": 48}, "power of two"),
        (4, {"quant_algo": "awq"}, "unknown --quant-algo"),
        (4, {"quant_algo": "wls", "symmetric": True}, "--symmetric needs --quant-algo rtn"),
        (4, {"quant_scheme": "dynamic"}, "with --bits 8"),
        (6, {}, "choose 2, 4 or 8"),
        (4, {"group_size": 32}, "do not apply to --format onnx"),
    ],
)
def test_bad_options_are_refused_before_any_work(target, bits, options, message):
    with pytest.raises(SrcrError, match=message) as error:
        target.resolve_quant(bits, None, options)
    assert "\n" not in str(error.value)


def test_quant_type_names_round_trip(target):
    spec = target.resolve_quant(None, "MatMulNBits-q2-rtn-b64-sym", {})
    assert (spec.bits, spec.options["algo"], spec.options["block_size"], spec.options["symmetric"]) == (
        2,
        "rtn",
        64,
        True,
    )
    assert target.resolve_quant(None, spec.quant_type, {}) == spec
    assert target.resolve_quant(None, "int8-dynamic", {}).options["scheme"] == "dynamic"
    assert target.resolve_quant(4, None, {}).quant_type == "MatMulNBits-q4-wls-b32"
    with pytest.raises(SrcrError, match="contradicts"):
        target.resolve_quant(8, "MatMulNBits-q4-wls-b32", {})


def test_block_size_that_does_not_divide_a_layer_leaves_nothing(target, tiny_model, smollm_tokenizer, tmp_path):
    spec = target.resolve_quant(4, None, {"quant_block_size": 128})  # the tiny model's hidden size is 64
    out = tmp_path / "model.onnx"
    with pytest.raises(SrcrError, match="does not divide the input dimension 64") as error:
        target.export(tiny_model, smollm_tokenizer, spec, out)
    assert "--quant-block-size" in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_export_leaves_nothing(target, tiny_model, smollm_tokenizer, tmp_path, monkeypatch):
    from srcr.targets.onnx import matmul_nbits

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(matmul_nbits, "quantize_linear_weights", interrupt)
    spec = target.resolve_quant(4, None, {})
    with pytest.raises(KeyboardInterrupt):
        target.export(tiny_model, smollm_tokenizer, spec, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_is_a_clear_error(target, tiny_model, smollm_tokenizer, tmp_path, monkeypatch):
    spec = target.resolve_quant(4, None, {})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    for attempt in (
        lambda: target.resolve_quant(4, None, {}),
        lambda: target.export(tiny_model, smollm_tokenizer, spec, tmp_path / "model.onnx"),
        lambda: target.open_runtime(tmp_path / "model.onnx"),
    ):
        with pytest.raises(SrcrError, match="pip install onnxruntime") as error:
            attempt()
        assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_smollm2_default_4bit_export_is_small_and_close(target, tmp_path):
    from srcr.exporter.models import load_default_model

    model, tokenizer = load_default_model()
    tokens = tokenizer(TEXT * 8, add_special_tokens=False)["input_ids"][:256]
    with torch.no_grad():
        reference = torch.log_softmax(model(torch.tensor([tokens])).logits[0].double(), -1).numpy()
    result = export(target, model, tokenizer, tmp_path, bits=4)
    runtime = target.open_runtime(result.artifact, device="cpu")
    try:
        kl = mean_kl(reference, runtime.logprobs(tokens))
        assert len(runtime.generate(tokens[:32], 8)) > 0
    finally:
        runtime.close()
    assert result.artifact_bytes < 90_000_000
    assert kl < 0.15
