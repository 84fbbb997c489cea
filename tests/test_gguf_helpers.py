"""Tiny random models for the GGUF tests: real SmolLM2 tokenizer (llama.cpp must accept it), few weights.

Imported by the other test_gguf_* modules; it holds no tests itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

SMOLLM_HINTS = {"tokenizer_pre": "smollm"}

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "In 2024, about 1,234 people attended the conference in São Paulo.",
    "Prices rose 3.5% year-on-year; analysts weren't surprised!",
]


def tiny_llama(tokenizer, seed: int = 0, hidden: int = 64, intermediate: int = 128, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return _spread_norms(LlamaForCausalLM(LlamaConfig(**settings)).eval())


def tiny_qwen2(tokenizer, seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**settings)).eval()
    with torch.no_grad():
        # Biases start at zero; non-zero ones check that q/k/v biases are written and not permuted.
        for layer in model.model.layers:
            for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                projection.bias.normal_(0, 0.5)
    return _spread_norms(model)


def _spread_norms(model):
    """Random norm gains and larger weights, so that logits differ visibly between tokens."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "norm" in name:
                parameter.uniform_(0.5, 1.5)
            elif parameter.ndim == 2:
                parameter.mul_(5.0)
    return model


def torch_logits(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_kl(reference_logits: np.ndarray, candidate_logprobs: np.ndarray) -> float:
    reference = log_softmax(reference_logits.astype(np.float64))
    return float((np.exp(reference) * (reference - candidate_logprobs.astype(np.float64))).sum(-1).mean())


def sample_tokens(tokenizer) -> list[int]:
    return tokenizer(" ".join(SENTENCES), add_special_tokens=False)["input_ids"]


def activation_imatrix(model, tokens: list[int]) -> dict[str, np.ndarray]:
    """Mean x^2 per input column of every decoder linear, keyed "<linear>.weight" like the pipeline's."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def accumulate(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
            sums[name] = (x * x).mean(0)

        return accumulate

    handles = [
        module.register_forward_hook(hook(f"{name}.weight"))
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]
    with torch.no_grad():
        model(torch.tensor([tokens]))
    for handle in handles:
        handle.remove()
    return {name: values.numpy().astype(np.float32) for name, values in sums.items()}


def leftovers(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*partial"))


def sentencepiece_style_tokenizer(vocab_size: int = 1200):
    """A Llama-2/Mistral-style tokenizer (BPE with byte fallback, "▁" for spaces) trained on lee_background."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from srcr.exporter.calibration import calibration_text

    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(calibration_text(None, None).text.splitlines(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
