"""llama.cpp quantization through GGUFTarget: type resolution, imatrix, type mix, atomic clean-up."""

from __future__ import annotations

import numpy as np
import pytest
from test_gguf_helpers import (
    activation_imatrix,
    leftovers,
    sample_tokens,
    tiny_llama,
)

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from srcr.base.errors import SrcrError  # noqa: E402
from srcr.targets.gguf.quantize import BITS_TO_TYPE, QUANT_TYPES, quantize_gguf, tensor_type_mix  # noqa: E402
from srcr.targets.gguf.target import GGUFTarget, imatrix_by_gguf_name  # noqa: E402


@pytest.mark.parametrize(("bits", "expected"), sorted(BITS_TO_TYPE.items()))
def test_bits_resolve_to_default_types(bits, expected):
    spec = GGUFTarget().resolve_quant(bits, None, {})
    assert (spec.format, spec.bits, spec.quant_type) == ("gguf", bits, expected)


def test_quant_type_by_name_is_case_insensitive():
    target = GGUFTarget()
    assert target.resolve_quant(None, "iq2_xxs", {}).quant_type == "IQ2_XXS"
    assert target.resolve_quant(None, "q4_k_m", {}).bits == 4
    assert target.resolve_quant(4, "Q4_0", {}).quant_type == "Q4_0"
    assert target.resolve_quant(None, None, {}).quant_type == "Q4_K_M"


@pytest.mark.parametrize(
    ("bits", "quant_type", "message"),
    [
        (None, "q4_x", "valid: "),
        (7, None, "2, 3, 4, 5, 6, 8, 16"),
        (2, "Q4_K_M", "contradicts"),
    ],
)
def test_bad_quant_requests_fail_with_one_line(bits, quant_type, message):
    with pytest.raises(SrcrError, match=message) as error:
        GGUFTarget().resolve_quant(bits, quant_type, {})
    assert "\n" not in str(error.value)
    if quant_type == "q4_x":
        assert all(name in str(error.value) for name in QUANT_TYPES)


def test_pure_option_gives_every_matrix_the_type(wide_llama_f32, tmp_path):
    target = GGUFTarget()
    assert target.resolve_quant(4, None, {"pure": True}).options == {"pure": True}
    with pytest.raises(SrcrError, match="its options: --pure"):
        target.resolve_quant(4, None, {"quant_block_size": 32})
    source, _ = wide_llama_f32
    quantize_gguf(source, tmp_path / "pure.gguf", "Q4_K_M", None, pure=True)
    assert tensor_type_mix(tmp_path / "pure.gguf")["types"] == {"Q4_K": 15}


def test_k_quant_mix_on_full_blocks(wide_llama_f32, tmp_path):
    source, _ = wide_llama_f32
    quantize_gguf(source, tmp_path / "q4.gguf", "Q4_K_M", None, n_threads=2)
    mix = tensor_type_mix(tmp_path / "q4.gguf")
    assert mix["types"]["Q4_K"] > 0
    assert set(mix["types"]) <= {"Q4_K", "Q6_K"}  # Q4_K_M's mix: Q6_K for some ffn_down/attn_v, output
    assert 4.5 < mix["bits_per_weight"] < 6.0
    reader = gguf.GGUFReader(tmp_path / "q4.gguf")
    norms = [tensor for tensor in reader.tensors if len(tensor.shape) == 1]
    assert norms and all(tensor.tensor_type.name == "F32" for tensor in norms)


def test_iq2_xxs_needs_and_uses_an_imatrix(wide_llama_f32, tmp_path):
    source, imatrix = wide_llama_f32
    with pytest.raises(SrcrError, match="importance matrix"):
        quantize_gguf(source, tmp_path / "no.gguf", "IQ2_XXS", None)
    quantize_gguf(source, tmp_path / "iq2.gguf", "iq2_xxs", imatrix)
    mix = tensor_type_mix(tmp_path / "iq2.gguf")
    assert mix["types"].get("IQ2_XXS", 0) >= 8  # most decoder matrices; the mix keeps a few wider
    decoder = [t for t in gguf.GGUFReader(tmp_path / "iq2.gguf").tensors if t.name.startswith("blk.")]
    matrices = [t for t in decoder if len(t.shape) == 2]
    bits = 8 * sum(int(t.n_bytes) for t in matrices) / sum(int(t.n_elements) for t in matrices)
    assert bits < 3.0


def test_llama_cpp_failure_reason_reaches_the_error(wide_llama_f32, tmp_path):
    source, imatrix = wide_llama_f32
    wrong = {name: values[:-1] for name, values in imatrix.items()}
    with pytest.raises(SrcrError, match="imatrix size"):
        quantize_gguf(source, tmp_path / "bad.gguf", "Q4_K_M", wrong)


def test_export_reports_mix_sizes_and_imatrix(wide_llama, small_vocab_tokenizer, tmp_path):
    target = GGUFTarget()
    imatrix = activation_imatrix(wide_llama, sample_tokens(small_vocab_tokenizer))
    out = tmp_path / "model.gguf"
    result = target.export(wide_llama, small_vocab_tokenizer, target.resolve_quant(4, None, {}), out, imatrix=imatrix)
    f16 = target.export(wide_llama, small_vocab_tokenizer, target.resolve_quant(16, None, {}), tmp_path / "f16.gguf")
    assert result.artifact_bytes == out.stat().st_size
    assert result.quantization["llama_cpp_type"] == "Q4_K_M"
    assert result.quantization["imatrix"] is True
    assert result.quantization["imatrix_entries"] == len(imatrix) == 14
    assert result.quantization["type_mix"] == tensor_type_mix(out)["types"]
    assert f16.bits_per_weight == 16.0
    assert 4.5 < result.bits_per_weight < 6.0
    assert set(result.format_info) >= {"gguf_version", "llama_cpp_python", "gguf_py"}
    assert leftovers(tmp_path) == []


def test_small_rows_fall_back_and_the_file_says_so(smollm_tokenizer, tmp_path):
    model = tiny_llama(smollm_tokenizer)  # 64/128-wide rows: no 256-blocks for K-quants
    target = GGUFTarget()
    result = target.export(model, smollm_tokenizer, target.resolve_quant(4, None, {}), tmp_path / "m.gguf")
    assert "Q4_K" not in result.quantization["type_mix"]
    assert sum(result.quantization["type_mix"].values()) == 15  # 14 decoder matrices + token_embd


def test_export_without_imatrix_for_iq_type_fails_before_work(smollm_tokenizer, tmp_path):
    target = GGUFTarget()
    out = tmp_path / "m.gguf"
    with pytest.raises(SrcrError, match="importance matrix"):
        target.export(tiny_llama(smollm_tokenizer), smollm_tokenizer, target.resolve_quant(None, "IQ1_S", {}), out)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_interrupted_quantization_leaves_no_intermediate(smollm_tokenizer, tmp_path, monkeypatch):
    import srcr.targets.gguf.target as gguf_target

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_target, "run_in_child", interrupted)
    target = GGUFTarget()
    with pytest.raises(KeyboardInterrupt):
        target.export(tiny_llama(smollm_tokenizer), smollm_tokenizer, target.resolve_quant(8, None, {}), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_imatrix_keys_must_name_model_weights():
    names = {"model.layers.0.mlp.up_proj.weight": "blk.0.ffn_up.weight"}
    values = np.ones(4, dtype=np.float32)
    assert imatrix_by_gguf_name({"model.layers.0.mlp.up_proj.weight": values}, names) == {"blk.0.ffn_up.weight": values}
    with pytest.raises(ValueError, match="no weight"):
        imatrix_by_gguf_name({"model.layers.9.mlp.up_proj.weight": values}, names)
