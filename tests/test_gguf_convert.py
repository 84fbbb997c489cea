"""HF -> GGUF conversion: llama.cpp must reproduce the PyTorch model's logits and tokenization."""

from __future__ import annotations

import numpy as np
import pytest
from test_gguf_helpers import (
    SENTENCES,
    SMOLLM_HINTS,
    mean_kl,
    sample_tokens,
    sentencepiece_style_tokenizer,
    tiny_llama,
    tiny_qwen2,
    torch_logits,
)

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from srcr.base.errors import SrcrError  # noqa: E402
from srcr.exporter.calibration import evaluation_text  # noqa: E402
from srcr.targets.gguf.convert import (  # noqa: E402
    SUPPORTED_ARCHITECTURES,
    convert_to_gguf,
    interleave_rope_rows,
    rope_parameters,
)
from srcr.targets.gguf.runtime import LlamaCppRuntime  # noqa: E402
from srcr.targets.gguf.vocab import detect_bpe_pre  # noqa: E402


def convert_and_run(model, tokenizer, path, ftype="F32"):
    names = convert_to_gguf(model, tokenizer, path, ftype, SMOLLM_HINTS)
    tokens = sample_tokens(tokenizer)
    runtime = LlamaCppRuntime(path, n_ctx=256)
    try:
        served_logits = runtime.forward(tokens, reset=True, first_row=0).astype(np.float64)
        served_logprobs = runtime.logprobs(tokens)
    finally:
        runtime.close()
    return names, torch_logits(model, tokens), served_logits, served_logprobs


@pytest.mark.parametrize(
    ("ftype", "max_logit_diff", "max_kl"),
    [("F32", 2e-2, 1e-5), ("F16", 5e-2, 1e-4)],
)
def test_tiny_llama_logits_match_pytorch(smollm_tokenizer, tmp_path, ftype, max_logit_diff, max_kl):
    model = tiny_llama(smollm_tokenizer)
    _, expected, logits, logprobs = convert_and_run(model, smollm_tokenizer, tmp_path / "m.gguf", ftype)
    assert logits.shape == expected.shape
    assert np.abs(logits - expected).max() < max_logit_diff
    assert mean_kl(expected, logprobs) < max_kl
    assert (logits.argmax(-1) == expected.argmax(-1)).all()


def test_tiny_qwen2_with_biases_and_untied_output_matches_pytorch(smollm_tokenizer, tmp_path):
    model = tiny_qwen2(smollm_tokenizer)
    names, expected, logits, logprobs = convert_and_run(model, smollm_tokenizer, tmp_path / "q.gguf")
    assert np.abs(logits - expected).max() < 2e-2
    assert mean_kl(expected, logprobs) < 1e-5
    assert names["model.layers.0.self_attn.q_proj.bias"] == "blk.0.attn_q.bias"
    assert names["lm_head.weight"] == "output.weight"
    reader = gguf.GGUFReader(tmp_path / "q.gguf")
    assert reader.get_field("general.architecture").contents() == "qwen2"
    assert "output.weight" in {tensor.name for tensor in reader.tensors}


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
    ],
    ids=["linear", "llama3"],
)
def test_rope_scaling_matches_pytorch(smollm_tokenizer, tmp_path, rope):
    model = tiny_llama(smollm_tokenizer, rope_parameters=rope)
    assert rope_parameters(model.config)["rope_type"] == rope["rope_type"]
    _, expected, logits, logprobs = convert_and_run(model, smollm_tokenizer, tmp_path / "r.gguf")
    assert np.abs(logits - expected).max() < 2e-2
    assert mean_kl(expected, logprobs) < 1e-5


def test_layout_of_written_file(smollm_tokenizer, tmp_path):
    model = tiny_llama(smollm_tokenizer)
    names = convert_to_gguf(model, smollm_tokenizer, tmp_path / "m.gguf", "F16", SMOLLM_HINTS)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    # Tied embeddings: llama.cpp reuses token_embd, and the lm_head's imatrix goes there too.
    assert "output.weight" not in tensors
    assert names["lm_head.weight"] == "token_embd.weight"
    assert names["model.layers.1.mlp.down_proj.weight"] == "blk.1.ffn_down.weight"
    for tensor in tensors.values():
        expected = "F16" if len(tensor.shape) == 2 else "F32"
        assert tensor.tensor_type.name == expected, tensor.name
    field = reader.get_field
    assert field("tokenizer.ggml.model").contents() == "gpt2"
    assert field("tokenizer.ggml.pre").contents() == "smollm"
    assert field("tokenizer.ggml.eos_token_id").contents() == smollm_tokenizer.eos_token_id
    assert field("tokenizer.ggml.bos_token_id").contents() == smollm_tokenizer.bos_token_id
    assert field("tokenizer.ggml.add_bos_token").contents() is False
    assert len(field("tokenizer.ggml.tokens").contents()) == model.config.vocab_size
    assert len(field("tokenizer.ggml.merges").data) > 40000
    assert "im_start" in field("tokenizer.chat_template").contents()
    assert field("llama.attention.head_count_kv").contents() == 2


def test_interleave_rope_rows_pairs_each_heads_halves():
    head_dim, n_head = 4, 2
    rows = np.arange(n_head * head_dim, dtype=np.float32)[:, None]
    permuted = interleave_rope_rows(rows, n_head)[:, 0]
    # Rotate-half pairs (0, 2), (1, 3) of each head become adjacent rows.
    assert permuted.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_unsupported_architecture_names_the_supported_ones(smollm_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(smollm_tokenizer)))
    with pytest.raises(SrcrError) as error:
        convert_to_gguf(model, smollm_tokenizer, tmp_path / "g.gguf", "F32")
    assert all(name in str(error.value) for name in SUPPORTED_ARCHITECTURES)
    assert "\n" not in str(error.value)


def test_tokenization_matches_hf_on_lee_corpus(smollm_tokenizer, tmp_path):
    model = tiny_llama(smollm_tokenizer)
    convert_to_gguf(model, smollm_tokenizer, tmp_path / "m.gguf", "F32", SMOLLM_HINTS)
    documents = [line for line in evaluation_text(None, None).text.splitlines() if line.strip()][:25]
    runtime = LlamaCppRuntime(tmp_path / "m.gguf", n_ctx=64)
    try:
        for text in documents + SENTENCES:
            expected = smollm_tokenizer(text, add_special_tokens=False)["input_ids"]
            assert runtime.tokenize(text) == expected, text
            assert runtime.detokenize(expected) == smollm_tokenizer.decode(expected)
    finally:
        runtime.close()


def test_sentencepiece_style_tokenizer_matches_hf(tmp_path):
    tokenizer = sentencepiece_style_tokenizer()
    model = tiny_llama(tokenizer)
    convert_to_gguf(model, tokenizer, tmp_path / "spm.gguf", "F32")
    reader = gguf.GGUFReader(tmp_path / "spm.gguf")
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    assert reader.get_field("tokenizer.ggml.add_space_prefix").contents() is True
    documents = [line for line in evaluation_text(None, None).text.splitlines() if line.strip()][:25]
    texts = documents + SENTENCES + ["naïve café, 東京 😀", "  two  spaces"]
    runtime = LlamaCppRuntime(tmp_path / "spm.gguf", n_ctx=256)
    try:
        for text in texts:
            assert runtime.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"], text
        tokens = tokenizer(SENTENCES[1], add_special_tokens=False)["input_ids"]
        expected = torch_logits(model, tokens)
        assert mean_kl(expected, runtime.logprobs(tokens)) < 1e-5
    finally:
        runtime.close()


def test_detect_bpe_pre_from_pre_tokenizer_json():
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    digits = {"type": "Digits", "individual_digits": True}
    split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?\s+"}}
    qwen_split = {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?\s+"}}
    sequence = {"type": "Sequence", "pretokenizers": [digits, byte_level]}
    assert detect_bpe_pre({"pre_tokenizer": sequence}) == "smollm"
    assert detect_bpe_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [split, byte_level]}}) == (
        "llama-bpe"
    )
    assert detect_bpe_pre({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [qwen_split, byte_level]}}) == (
        "qwen2"
    )
    assert detect_bpe_pre({"pre_tokenizer": byte_level}) == "gpt-2"
    with pytest.raises(SrcrError, match="tokenizer_pre"):
        detect_bpe_pre({"pre_tokenizer": {"type": "Whitespace"}})


def test_rope_theta_read_from_top_level_or_rope_parameters():
    class Legacy:
        rope_theta = 5e5
        rope_scaling = None

    class Current:
        rope_parameters = {"rope_type": "default", "rope_theta": 1e5}

    assert rope_parameters(Legacy()) == {"rope_theta": 5e5, "rope_type": "default"}
    assert rope_parameters(Current())["rope_theta"] == 1e5


@pytest.mark.slow
@pytest.mark.parametrize(("ftype", "max_kl"), [("F32", 1e-4), ("F16", 1e-3)])
def test_smollm2_gguf_reproduces_pytorch(default_checkpoint, tmp_path, ftype, max_kl):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srcr.exporter.models import HINTS_FILE

    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(default_checkpoint, dtype=torch.float32).eval()
    hints = json.loads((default_checkpoint / HINTS_FILE).read_text())
    convert_to_gguf(model, tokenizer, tmp_path / "s.gguf", ftype, hints)
    tokens = tokenizer(evaluation_text(None, None).text[:2000], add_special_tokens=False)["input_ids"][:256]
    runtime = LlamaCppRuntime(tmp_path / "s.gguf", n_ctx=512)
    try:
        assert runtime.tokenize(tokenizer.decode(tokens)) == tokens
        expected = torch_logits(model, tokens)
        logits = runtime.forward(tokens, reset=True, first_row=0)
        assert mean_kl(expected, runtime.logprobs(tokens)) < max_kl
        assert (logits.argmax(-1) == expected.argmax(-1)).mean() > 0.98
    finally:
        runtime.close()
