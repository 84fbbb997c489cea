"""A random bfloat16 Llama written to disk one decoder layer per file, never held whole: the large-model
benches build their models from a config with this."""

from __future__ import annotations

from pathlib import Path

import torch


def write_random_llama(folder: Path, config) -> int:  # noqa: ANN001 (a transformers LlamaConfig)
    """Write `config`'s model with N(0, 0.02) weights (norm gains 1) in bfloat16: one safetensors file per
    decoder layer and per other tensor (a tied head is not stored), the index and config.json. Returns the
    parameter count."""
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    from srcr.base.weights import FolderWriter

    config.architectures = ["LlamaForCausalLM"]
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, tensor in skeleton.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        group = name.split(".")[2] if name.startswith("model.layers.") else name.split(".")[-2]
        groups.setdefault(group, {})[name] = tensor.shape
    generator = torch.Generator().manual_seed(0)
    writer = FolderWriter(folder)
    count = 0
    for group, shapes in groups.items():
        made = {}
        for name, shape in shapes.items():
            norm = name.endswith("norm.weight")
            values = torch.ones(shape) if norm else torch.randn(shape, generator=generator) * 0.02
            made[name] = values.to(torch.bfloat16)
            count += values.numel()
        writer.write(f"model-{group}.safetensors", made)
    writer.finish()
    config.save_pretrained(folder)
    return count
