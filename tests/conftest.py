"""Shared fixtures: a real tokenizer (SmolLM2's, from the embedded package) on tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval reads local task data through datasets


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from threads, and torch's OpenMP workers spinning beside llama.cpp's
    and ONNX Runtime's thread pools on 2 cores made some tests 10-50x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _own_stage_cache(tmp_path, monkeypatch):
    """Each test its own stage cache: one test's finished configurations must not satisfy another's."""
    monkeypatch.setenv("SRCR_STAGE_CACHE", str(tmp_path / "stage-cache"))


@pytest.fixture(scope="session")
def default_checkpoint() -> Path:
    from srcr.exporter.models import ensure_default_checkpoint

    return ensure_default_checkpoint()


@pytest.fixture(scope="session")
def smollm_tokenizer(default_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_checkpoint)


def make_tiny_llama(tokenizer, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    config = LlamaConfig(**{**settings, **overrides})
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def magnitude_pruned_copy(model, sparsity: float):
    """A copy of `model` with each decoder linear's smallest-magnitude weights zeroed: known damage for evaluators."""
    import copy

    import torch

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for module in pruned.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                threshold = weight.abs().flatten().kthvalue(int(sparsity * weight.numel())).values
                weight[weight.abs() <= threshold] = 0.0
    return pruned


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A saved tiny random Llama with SmolLM2's tokenizer: a complete local model folder for the CLI."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_llama(smollm_tokenizer).save_pretrained(folder, safe_serialization=True)
    smollm_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def small_vocab_tokenizer():
    """1,200 tokens: the embedding stays small, so quantizing 256-wide models takes seconds."""
    from test_gguf_helpers import sentencepiece_style_tokenizer

    return sentencepiece_style_tokenizer()


@pytest.fixture(scope="session")
def wide_llama(small_vocab_tokenizer):
    """Rows of 256 and 512 columns: every K-quant and IQ type applies without fallback."""
    from test_gguf_helpers import tiny_llama

    return tiny_llama(small_vocab_tokenizer, hidden=256, intermediate=512)


@pytest.fixture(scope="session")
def wide_llama_f32(wide_llama, small_vocab_tokenizer, tmp_path_factory):
    """wide_llama as an F32 GGUF, and its importance matrix by GGUF tensor name."""
    from test_gguf_helpers import activation_imatrix, sample_tokens

    from srcr.targets.gguf.convert import convert_to_gguf
    from srcr.targets.gguf.target import imatrix_by_gguf_name

    path = tmp_path_factory.mktemp("wide") / "wide-f32.gguf"
    names = convert_to_gguf(wide_llama, small_vocab_tokenizer, path, "F32")
    imatrix = imatrix_by_gguf_name(activation_imatrix(wide_llama, sample_tokens(small_vocab_tokenizer)), names)
    return path, imatrix
