"""LlamaCppRuntime: the evaluators' Runtime interface over llama.cpp."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf_helpers import SMOLLM_HINTS, sample_tokens, tiny_llama

pytest.importorskip("llama_cpp")

from srcr.base.errors import SrcrError  # noqa: E402
from srcr.base.runtime import Runtime  # noqa: E402
from srcr.targets.gguf.convert import convert_to_gguf  # noqa: E402
from srcr.targets.gguf.runtime import LlamaCppRuntime  # noqa: E402
from srcr.targets.gguf.target import GGUFTarget  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_and_file(smollm_tokenizer, tmp_path_factory):
    model = tiny_llama(smollm_tokenizer, seed=1)
    path = tmp_path_factory.mktemp("runtime") / "tiny.gguf"
    convert_to_gguf(model, smollm_tokenizer, path, "F32", SMOLLM_HINTS)
    return model, path


@pytest.fixture
def runtime(tiny_model_and_file):
    opened = GGUFTarget().open_runtime(tiny_model_and_file[1], device="cpu")
    yield opened
    opened.close()


def test_runtime_protocol_and_info(runtime):
    assert isinstance(runtime, Runtime)
    info = runtime.info()
    assert info["runtime"] == "llama.cpp"
    assert info["backend"] == "cpu"
    assert info["n_threads"] >= 1
    assert info["llama_cpp_python"]


def test_tokenize_adds_no_bos(runtime, smollm_tokenizer):
    text = "Hello world"
    tokens = runtime.tokenize(text)
    assert tokens == smollm_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert smollm_tokenizer.bos_token_id not in tokens
    assert runtime.detokenize(tokens) == text
    # Special-token text stays plain text.
    assert smollm_tokenizer.eos_token_id not in runtime.tokenize("<|im_end|>")


def test_logprobs_are_normalised_rows_for_each_position(runtime, smollm_tokenizer):
    tokens = sample_tokens(smollm_tokenizer)
    logprobs = runtime.logprobs(tokens)
    assert logprobs.dtype == np.float32
    assert logprobs.shape == (len(tokens), len(smollm_tokenizer))
    np.testing.assert_allclose(np.exp(logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-4)
    # A shorter window after a longer one: the cache is reset, rows are the prefix's own.
    np.testing.assert_allclose(runtime.logprobs(tokens[:5]), logprobs[:5], atol=1e-3)


def test_greedy_generation_matches_pytorch_argmax(runtime, tiny_model_and_file, smollm_tokenizer):
    model = tiny_model_and_file[0]
    prompt = sample_tokens(smollm_tokenizer)[:12]
    generated = runtime.generate(prompt, max_new_tokens=8)
    expected: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(torch.tensor([prompt + expected])).logits[0, -1].argmax())
            if token == smollm_tokenizer.eos_token_id:
                break
            expected.append(token)
    assert generated == expected


def test_generation_stops_at_end_of_sequence(smollm_tokenizer, tmp_path):
    eos = smollm_tokenizer.eos_token_id
    model = tiny_llama(smollm_tokenizer, tie_word_embeddings=False)
    with torch.no_grad():
        # Hidden dimension 0 holds a large constant no layer writes to, the final norm keeps only it,
        # and only the EOS row of the output projection reads it: EOS wins every step.
        model.model.embed_tokens.weight[:, 0] = 1000.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0].zero_()
            layer.mlp.down_proj.weight[0].zero_()
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[eos].zero_()
        model.lm_head.weight[eos, 0] = 1000.0
    prompt = sample_tokens(smollm_tokenizer)[:6]
    assert int(model(torch.tensor([prompt])).logits[0, -1].argmax()) == eos
    convert_to_gguf(model, smollm_tokenizer, tmp_path / "eos.gguf", "F32", SMOLLM_HINTS)
    runtime = LlamaCppRuntime(tmp_path / "eos.gguf", n_ctx=64)
    try:
        assert runtime.generate(prompt, max_new_tokens=5) == []
    finally:
        runtime.close()


def test_window_longer_than_context_is_refused(tiny_model_and_file):
    runtime = LlamaCppRuntime(tiny_model_and_file[1], n_ctx=32)
    try:
        with pytest.raises(SrcrError, match="context"):
            runtime.logprobs(list(range(100, 140)))
        assert len(runtime.generate(list(range(100, 128)), max_new_tokens=50)) <= 4
    finally:
        runtime.close()


def test_unknown_device_is_refused(tiny_model_and_file):
    with pytest.raises(SrcrError, match="auto, cpu"):
        GGUFTarget().open_runtime(tiny_model_and_file[1], device="tpu")
