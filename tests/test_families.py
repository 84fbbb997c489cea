"""The families edge users ship, through both targets: Llama 3.2 (llama3 RoPE scaling, srcr's own GGUF writer),
Qwen 3 (q/k norms), Gemma 3 (sliding and full layers, norm offsets, embedding scale) and Phi-3 (fused qkv and
gate_up; with a GPT-2 tokenizer, as Phi-4-mini ships) through llama.cpp's converter.

Tiny models from each family's transformers config, random weights sharpened so the distributions are not
flat; transformers' own logits are the oracle, over a sequence four times Gemma 3's sliding window.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from srcr.base.errors import SrcrError
from srcr.targets.gguf import upstream
from srcr.targets.gguf.target import SRCR_WRITER
from srcr.targets.registry import get_target

WINDOW = 16
TOKENS = 64  # > WINDOW: sliding layers must hide what full layers see
COMMON = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}
FAMILIES = {
    "llama3.2": ("llama", {"head_dim": 16, "rope_parameters": LLAMA3_ROPE}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    # Six layers: llama.cpp lays Gemma 3 out as five sliding layers then a full one, as Google ships it.
    "gemma3": (
        "gemma3_text",
        {"num_hidden_layers": 6, "head_dim": 16, "sliding_window": WINDOW, "query_pre_attn_scalar": 16},
    ),
    "phi3": ("phi3", {"tie_word_embeddings": False}),
}


def sharpened(model):
    """Matrices ×3: sharper than the init's near-uniform next-token distributions, so parity means something."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
    return model.eval()


def make_family_folder(folder: Path, family: str, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, extra = FAMILIES[family]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **{**COMMON, **ids, **extra})
    torch.manual_seed(0)
    model = sharpened(AutoModelForCausalLM.from_config(config))
    model.save_pretrained(folder)
    # Saved as transformers saves it: for Phi-3 a BPE tokenizer.json and no tokenizer.model, its class not
    # named GPT-2's (llama.cpp's Phi-3 converter reads SentencePiece unless told; srcr tells it).
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, smollm_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A Phi-4-mini-like name: llama.cpp sets Phi-3 token attributes by the model's name, and this tiny model
    # carries SmolLM2's vocabulary, not Phi-3's.
    name = "phi-4-mini-tiny" if request.param == "phi3" else request.param
    folder = make_family_folder(tmp_path_factory.mktemp("family") / name, request.param, smollm_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return request.param, folder, model, tokenizer


def lee_text() -> str:
    from srcr.exporter.calibration import calibration_text

    return calibration_text(None, None).text[:20000]


def token_ids(tokenizer) -> list[int]:
    ids = tokenizer(lee_text())["input_ids"][:TOKENS]
    assert len(ids) == TOKENS
    return ids


def transformers_logprobs(model, ids) -> np.ndarray:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1).numpy()


def mean_kl(reference: np.ndarray, got: np.ndarray) -> float:
    return float((np.exp(reference) * (reference - got)).sum(-1).mean())


def export(fmt: str, model, tokenizer, folder: Path, out: Path, bits: int | None, quant_type: str | None = None):
    target = get_target(fmt)
    spec = target.resolve_quant(bits, quant_type, {})
    target.check_model(model.config, spec)
    hints = {"source_folder": str(folder), "model_name": folder.name}
    return target, target.export(model, tokenizer, spec, out, hints=hints)


def test_f16_gguf_matches_transformers(family, tmp_path):
    name, folder, model, tokenizer = family
    target, result = export("gguf", model, tokenizer, folder, tmp_path / "model.gguf", 16)
    writer = SRCR_WRITER if name == "llama3.2" else upstream.locate_converter().label()
    assert result.format_info["converter"] == writer
    ids = token_ids(tokenizer)
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        assert runtime.tokenize(lee_text()[:2000])[:TOKENS] == ids
        assert mean_kl(transformers_logprobs(model, ids), runtime.logprobs(ids)) < 1e-3
    finally:
        runtime.close()


def test_fp32_onnx_matches_transformers_in_prefill_and_decode(family, tmp_path):
    _, folder, model, tokenizer = family
    target, result = export("onnx", model, tokenizer, folder, tmp_path / "model.onnx", None, "fp32")
    ids = token_ids(tokenizer)
    reference = transformers_logprobs(model, ids)
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        assert mean_kl(reference, runtime.logprobs(ids)) < 1e-3
        # Decoding past the window from the KV cache, one token at a time.
        runtime.forward(ids[:WINDOW], True, 0)
        rows = np.stack([runtime.forward([token], False, 0)[-1] for token in ids[WINDOW:]])
        decoded = torch.log_softmax(torch.from_numpy(rows).float(), -1).numpy()
        assert mean_kl(reference[WINDOW:], decoded) < 1e-3
    finally:
        runtime.close()


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_4bit_export_loads_and_generates_like_transformers(family, fmt, tmp_path):
    _, folder, model, tokenizer = family
    target, result = export(fmt, model, tokenizer, folder, tmp_path / f"model.{fmt}", 4)
    ids = token_ids(tokenizer)
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        generated = runtime.generate(ids[:WINDOW], 8)
        kl = mean_kl(transformers_logprobs(model, ids), runtime.logprobs(ids))
    finally:
        runtime.close()
    assert len(generated) == 8 and all(0 <= token < model.config.vocab_size for token in generated)
    assert 0 < kl < 0.05  # 4-bit damage, not a different model


GROUPS = {  # linears that read one input, pruned (and their Hessian shared) together
    "llama3.2": [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj",
                 "self_attn.v_proj"], ["self_attn.o_proj"]],
    "phi3": [["mlp.down_proj"], ["mlp.gate_up_proj"], ["self_attn.o_proj"], ["self_attn.qkv_proj"]],
}  # fmt: skip
GROUPS["qwen3"] = GROUPS["gemma3"] = GROUPS["llama3.2"]


def test_pruning_groups_each_familys_linears_by_their_input(family):
    from srcr.exporter.pruning import PruneSpec
    from srcr.exporter.pruning.driver import calibrate_layer, capture_layer_inputs
    from srcr.exporter.pruning.sparsegpt import SparseGPT

    name, _, model, tokenizer = family
    ids = torch.tensor([token_ids(tokenizer)])
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, model.model.layers, ids, torch.device("cpu"))
        groups = calibrate_layer(model.model.layers[0], inputs, kwargs[0], PruneSpec("sparsegpt", 0.5), SparseGPT)
    assert sorted(sorted(group.linears) for group in groups) == GROUPS[name]


def test_structured_pruning_of_fused_phi3_is_refused_before_loading(tmp_path, smollm_tokenizer, monkeypatch):
    from typer.testing import CliRunner

    from srcr.exporter import pipeline
    from srcr.exporter.cli import app

    folder = make_family_folder(tmp_path / "phi-4-mini-tiny", "phi3", smollm_tokenizer)
    monkeypatch.setattr(pipeline, "load_weights", lambda *args: pytest.fail("weights were loaded"))
    out = tmp_path / "out"
    args = ["export", "--model", str(folder), "--ffn-ratio", "0.25", "--format", "onnx", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Llama-style layers" in " ".join(result.output.split())
    assert not out.exists() or list(out.iterdir()) == []


def longrope_phi(tokenizer, original: int):
    """Phi-3.5/Phi-4-mini's RoPE: short factors up to `original` positions, long factors past them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    half = 8
    rope = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0 + 0.1 * index for index in range(half)],
        "long_factor": [2.0 + 0.5 * index for index in range(half)],
        "original_max_position_embeddings": original,
    }
    settings = {**COMMON, "num_hidden_layers": 2, "tie_word_embeddings": False, "max_position_embeddings": 4 * original}
    config = AutoConfig.for_model(
        "phi3", vocab_size=len(tokenizer), original_max_position_embeddings=original, rope_parameters=rope, **settings
    )
    config.architectures = ["Phi3ForCausalLM"]
    torch.manual_seed(0)
    return sharpened(AutoModelForCausalLM.from_config(config))


def test_longrope_onnx_is_exact_up_to_its_original_length_and_refuses_beyond(smollm_tokenizer, tmp_path):
    model = longrope_phi(smollm_tokenizer, original=32)
    target, result = export("onnx", model, smollm_tokenizer, tmp_path, tmp_path / "phi.onnx", None, "fp32")
    ids = token_ids(smollm_tokenizer)
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        assert runtime.context_length == 32
        assert mean_kl(transformers_logprobs(model, ids[:32]), runtime.logprobs(ids[:32])) < 1e-3
        with pytest.raises(SrcrError, match="context of 32"):
            runtime.logprobs(ids)
    finally:
        runtime.close()


def test_a_phi3_bpe_tokenizer_is_converted_as_gpt2_and_tokenizes_like_transformers(tmp_path, smollm_tokenizer):
    """A Phi-3-architecture model with a BPE tokenizer (as Phi-4 ships; llama.cpp's converter asked for
    tokenizer.model): the preflight passes, and llama.cpp tokenizes the converted vocabulary as transformers."""
    from llama_cpp import llama_cpp as capi
    from transformers import AutoConfig

    folder = make_family_folder(tmp_path / "phi-4-mini-tiny", "phi3", smollm_tokenizer)
    saved_settings = (folder / "tokenizer_config.json").read_text()
    assert json.loads(saved_settings)["tokenizer_class"] != "GPT2Tokenizer"
    assert not (folder / "tokenizer.model").exists()
    get_target("gguf").check_files(folder, AutoConfig.from_pretrained(folder))
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (copy / name).write_bytes((folder / name).read_bytes())
    vocab = tmp_path / "vocab.gguf"
    upstream.run_converter(upstream.locate_converter(), copy, vocab, "f32", folder.name, vocab_only=True)
    assert (folder / "tokenizer_config.json").read_text() == saved_settings  # the user's folder is untouched

    params = capi.llama_model_default_params()
    params.vocab_only = True
    model = capi.llama_model_load_from_file(str(vocab).encode(), params)
    assert model
    try:
        data = lee_text()[:2000].encode()
        buffer = (capi.llama_token * (len(data) + 8))()
        vocabulary = capi.llama_model_get_vocab(model)
        count = capi.llama_tokenize(vocabulary, data, len(data), buffer, len(buffer), False, False)
        assert list(buffer[:count]) == smollm_tokenizer(data.decode())["input_ids"]
    finally:
        capi.llama_model_free(model)


def test_a_tokenizer_the_converter_cannot_read_is_refused_before_calibration(tmp_path, smollm_tokenizer, monkeypatch):
    from typer.testing import CliRunner

    from srcr.exporter import pipeline
    from srcr.exporter.cli import app

    folder = make_family_folder(tmp_path / "phi-4-mini-tiny", "phi3", smollm_tokenizer)
    (folder / "tokenizer.json").unlink()  # neither a BPE vocabulary nor a SentencePiece model is left
    monkeypatch.setattr(pipeline, "load_weights", lambda *args: pytest.fail("weights were loaded"))
    monkeypatch.setattr(pipeline, "load_calibration", lambda *args: pytest.fail("calibration ran"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--format", "gguf", "--out", str(out)])
    assert result.exit_code != 0
    message = " ".join(result.output.split())
    assert "cannot convert the tokenizer" in message and "tokenizer.model" in message, message
    assert "nothing was calibrated" in message and "Traceback" not in message
    assert not out.exists() or list(out.iterdir()) == []


def test_longrope_gguf_matches_transformers_below_its_original_length(smollm_tokenizer, tmp_path):
    # llama.cpp takes the long factors when its context exceeds the original length; srcr's is 2048.
    model = longrope_phi(smollm_tokenizer, original=2048)
    folder = tmp_path / "phi-4-mini-longrope"
    folder.mkdir()
    smollm_tokenizer.save_pretrained(folder)
    target, result = export("gguf", model, smollm_tokenizer, folder, tmp_path / "phi.gguf", 16)
    ids = token_ids(smollm_tokenizer)
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        assert mean_kl(transformers_logprobs(model, ids), runtime.logprobs(ids)) < 1e-3
    finally:
        runtime.close()


def test_gemma3_prunes_past_its_window_from_the_cli(tmp_path, smollm_tokenizer):
    """Mixed sliding/full layers calibrate on samples longer than the window, without the user naming it."""
    from typer.testing import CliRunner

    from srcr.exporter.cli import app

    folder = make_family_folder(tmp_path / "gemma-3-tiny", "gemma3", smollm_tokenizer)
    out = tmp_path / "out"
    args = ["export", "--model", str(folder), "--sparsity", "0.25", "--bits", "4", "--format", "gguf"]
    args += ["--seq-len", str(4 * WINDOW), "--calib-samples", "4", "--eval-windows", "2", "--last-word-items", "5"]
    args += ["--new-tokens", "4", "--out", str(out), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads(next(out.glob("*.json")).read_text())
    assert "convert_hf_to_gguf" in manifest["artifact"]["converter"]
    assert manifest["quantization"]["imatrix_entries"] == 6 * 7  # every linear of every layer
    assert manifest["pruning"]["achieved_sparsity"] == pytest.approx(0.25, abs=0.01)


def test_sentencepiece_tokenizer_survives_llama_cpps_converter(tmp_path):
    """A SentencePiece tokenizer (Gemma's, Phi-3's and Llama 2's kind), trained here on the Lee corpus:
    llama.cpp tokenizes and detokenizes as transformers does."""
    import sentencepiece
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    text = lee_text()
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model_file, vocab_size=1000, model_type="bpe",
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    folder = tmp_path / "gemma-spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model_file.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer", **special}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=len(tokenizer), **{**COMMON, "num_hidden_layers": 1}, head_dim=16,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    config.architectures = ["Gemma3ForCausalLM"]
    model = AutoModelForCausalLM.from_config(config).eval()
    target, result = export("gguf", model, tokenizer, folder, tmp_path / "spm.gguf", 16)
    lines = [line for line in text.splitlines() if line.strip()][:40]
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        for line in lines:
            assert runtime.tokenize(line) == tokenizer(line)["input_ids"]
            assert runtime.detokenize(runtime.tokenize(line)) == line
    finally:
        runtime.close()


def test_llama_cpps_converter_lists_the_families():
    known = upstream.architectures(upstream.locate_converter())
    assert {"Gemma3ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM", "LlamaForCausalLM"} <= known
    assert "OPTForCausalLM" not in known


def _config(family: str):
    from transformers import AutoConfig

    model_type, extra = FAMILIES[family]
    config = AutoConfig.for_model(model_type, vocab_size=256, **{**COMMON, **extra})
    config.architectures = [type(config).__name__.replace("TextConfig", "Config").replace("Config", "ForCausalLM")]
    return config


def test_a_family_llama_cpp_cannot_convert_is_refused_before_any_weight():
    from transformers import OPTConfig

    config = OPTConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, ffn_dim=64, num_attention_heads=2)
    config.architectures = ["OPTForCausalLM"]
    target = get_target("gguf")
    with pytest.raises(SrcrError, match="cannot convert OPTForCausalLM.*--format onnx"):
        target.check_model(config, target.resolve_quant(4, None, {}))


def test_gptq_is_refused_for_families_srcr_does_not_write():
    target = get_target("gguf")
    spec = target.resolve_quant(4, None, {"quantizer": "gptq"})
    with pytest.raises(SrcrError, match="use --quantizer llama.cpp"):
        target.check_model(_config("gemma3"), spec)
    target.check_model(_config("llama3.2"), spec)


def test_dropping_gemma3_layers_is_refused_for_gguf_but_not_onnx():
    config = _config("gemma3")
    with pytest.raises(SrcrError, match="--drop-layers"):
        get_target("gguf").check_structure(config, drops_layers=True, per_layer_widths=False)
    get_target("gguf").check_structure(config, drops_layers=False, per_layer_widths=False)
    get_target("onnx").check_structure(config, drops_layers=True, per_layer_widths=True)


def test_a_missing_or_stale_converter_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.delenv(upstream.CONVERTER_ENV, raising=False)
    monkeypatch.setattr(upstream, "default_folder", lambda: tmp_path / "none")
    with pytest.raises(SrcrError, match="python -m srcr.targets.gguf.upstream"):
        upstream.locate_converter()
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / upstream.SCRIPT).write_text("")
    (stale / upstream.VERSION_FILE).write_text("0.0.1\n")
    monkeypatch.setattr(upstream, "default_folder", lambda: stale)
    with pytest.raises(SrcrError, match="0.0.1.*again"):
        upstream.locate_converter()
    monkeypatch.setenv(upstream.CONVERTER_ENV, str(tmp_path / "checkout"))
    with pytest.raises(SrcrError, match=upstream.CONVERTER_ENV):
        upstream.locate_converter()


def test_gemma3_without_the_converter_fails_before_loading(monkeypatch, tmp_path, smollm_tokenizer):
    from typer.testing import CliRunner

    from srcr.exporter.cli import app

    folder = make_family_folder(tmp_path / "gemma", "gemma3", smollm_tokenizer)
    monkeypatch.setenv(upstream.CONVERTER_ENV, str(tmp_path / "no-llama.cpp"))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--model", str(folder), "--format", "gguf", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert upstream.CONVERTER_ENV in " ".join(result.output.split())
    assert not out.exists() or list(out.iterdir()) == []


def _sdist(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_install_unpacks_only_the_converter_and_nothing_outside(tmp_path):
    root = "llama_cpp_python-9.9.9/vendor/llama.cpp/"
    sdist = _sdist(
        tmp_path / "llama_cpp_python-9.9.9.tar.gz",
        {
            "llama_cpp_python-9.9.9/pyproject.toml": b"",
            f"{root}{upstream.SCRIPT}": b"print('converter')\n",
            f"{root}conversion/__init__.py": b"",
            f"{root}gguf-py/gguf/__init__.py": b"",
            f"{root}LICENSE": b"MIT",
            f"{root}src/llama.cpp": b"int main;",
            f"{root}gguf-py/../../../../escaped.txt": b"no",
        },
    )
    folder = upstream.install(sdist, tmp_path / "share" / "converter")
    found = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    assert found == sorted(
        [upstream.SCRIPT, "conversion/__init__.py", "gguf-py/gguf/__init__.py", "LICENSE", upstream.VERSION_FILE]
    )
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "share" / "escaped.txt").exists()
    with pytest.raises(SrcrError, match="no vendor/llama.cpp"):
        upstream.install(_sdist(tmp_path / "other.tar.gz", {"other/setup.py": b""}), tmp_path / "other")


def _gemma3(tokenizer, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, settings = FAMILIES["gemma3"]
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **{**COMMON, **ids, **settings, **extra})
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(0)
    return sharpened(AutoModelForCausalLM.from_config(config)).eval()


def test_a_file_llama_cpp_does_not_run_as_the_model_is_refused_before_quantizing(tmp_path, smollm_tokenizer):
    """Gemma 3 with full and sliding layers alternating, where llama.cpp assumes five sliding then one full:
    the converter writes it without complaint, and the unrounded file's check refuses it."""
    model = _gemma3(smollm_tokenizer, layer_types=["full_attention", "sliding_attention"] * 3)
    folder = tmp_path / "gemma-3-alternating"
    smollm_tokenizer.save_pretrained(folder)
    out = tmp_path / "out" / "model.gguf"
    out.parent.mkdir()
    with pytest.raises(SrcrError, match=r"does not reproduce the converted gemma3_text model \(mean KL 0\.\d+"):
        export("gguf", model, smollm_tokenizer, folder, out, None, "Q8_0")
    assert list(out.parent.iterdir()) == []  # neither the artifact nor the unrounded intermediate is left


def test_the_unrounded_file_is_checked_and_the_measure_recorded(tmp_path, smollm_tokenizer, monkeypatch):
    from srcr.targets.gguf.fidelity import SKIP_CHECK_VARIABLE

    model = _gemma3(smollm_tokenizer)  # the layout llama.cpp assumes
    folder = tmp_path / "gemma-3-tiny"
    smollm_tokenizer.save_pretrained(folder)
    _, result = export("gguf", model, smollm_tokenizer, folder, tmp_path / "q8.gguf", None, "Q8_0")
    assert 0 <= result.format_info["conversion_kl"] < 1e-5
    _, result = export("gguf", model, smollm_tokenizer, folder, tmp_path / "f32.gguf", None, "F32")
    assert result.format_info["conversion_kl"] < 1e-5  # the lossless artifact itself
    _, result = export("gguf", model, smollm_tokenizer, folder, tmp_path / "f16.gguf", None, "F16")
    assert result.format_info["conversion_kl"] is None  # rounded: quantization noise, not the converter's
    monkeypatch.setenv(SKIP_CHECK_VARIABLE, "1")
    bad = _gemma3(smollm_tokenizer, layer_types=["full_attention", "sliding_attention"] * 3)
    _, result = export("gguf", bad, smollm_tokenizer, folder, tmp_path / "skipped.gguf", None, "Q8_0")
    assert result.format_info["conversion_kl"] is None
