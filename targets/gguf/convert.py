"""Hugging Face causal LM -> F32/F16/BF16 GGUF file that llama.cpp loads.

Hyperparameters and tensor names follow gguf-py's tables (`gguf.get_tensor_name_map`); the only
weight transform is the rotary permutation of q/k for the `llama` architecture, whose graph uses
llama.cpp's interleaved (GPT-J style) rope on the rows that Hugging Face keeps in rotate-half order.

The file is written tensor by tensor: every tensor's header entry comes from the model's shapes,
then each tensor is read from its `TensorSource` (the model in memory, or a folder of safetensors),
converted and written before the next is read, so the writer holds one tensor at a time.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import gguf
import numpy as np
import torch

from srcr.base.errors import SrcrError
from srcr.base.grids import BlockCodes
from srcr.base.shapes import head_dim as head_dim_of
from srcr.base.weights import ModuleTensors, TensorSource
from srcr.targets.gguf.blocks import GGML_TYPES, pack
from srcr.targets.gguf.vocab import tokenizer_metadata

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class ArchitectureSpec:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama arch: interleaved rope in llama.cpp, rotate-half in transformers


# Hugging Face `config.model_type` -> how llama.cpp runs it. SmolLM/SmolLM2 are `llama`.
_ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "mistral": ArchitectureSpec(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "qwen2": ArchitectureSpec(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCHITECTURES)

_FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}
FILE_TYPES = tuple(_FILE_TYPES)


def architecture_spec(config: PretrainedConfig) -> ArchitectureSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise SrcrError(
            f"the GGUF target cannot convert model_type {model_type!r}; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (or export with --format onnx)"
        )
    return _ARCHITECTURES[model_type]


# Decoder layers of different widths (structured pruning's global allocation) are written as llama.cpp's
# `deci` architecture: Llama with per-layer head counts and FFN widths, the same tensors and RoPE layout.
_PER_LAYER = ArchitectureSpec(gguf.MODEL_ARCH.DECI, permute_qk=True)


def layer_shapes(model: Any) -> list[tuple[int, int, int]]:
    """(FFN width, query heads, KV heads) of every decoder layer, read from its weights."""
    dim = head_dim_of(model.config)
    return [
        (
            layer.mlp.down_proj.in_features,
            layer.self_attn.q_proj.out_features // dim,
            layer.self_attn.k_proj.out_features // dim,
        )
        for layer in model.model.layers
    ]


def architecture_for(model: Any) -> ArchitectureSpec:
    """The model's own architecture, or `deci` when its layers differ in width."""
    arch = architecture_spec(model.config)
    if len(set(layer_shapes(model))) <= 1:
        return arch
    if arch.gguf_arch != gguf.MODEL_ARCH.LLAMA:
        raise SrcrError(
            f"layers of different widths are written with llama.cpp's deci architecture, which holds Llama-family "
            f"models, not {model.config.model_type}; use --width-allocation uniform"
        )
    return _PER_LAYER


def convert_to_gguf(
    model: Any,
    tokenizer: Any,
    out: Path,
    ftype: Literal["F32", "F16", "BF16"],
    hints: dict[str, Any] | None = None,
    codes: Mapping[str, BlockCodes] | None = None,
    weights: TensorSource | None = None,
) -> dict[str, str]:
    """Write `model` + `tokenizer` to `out` as a GGUF; return {hf weight name: GGUF tensor name}.

    Weights named in `codes` are written as their grid's ggml type from those codes and scales (no
    rounding here), every other one as `ftype`. Tensors are read from `weights` (default: the model's
    own); `model` then only gives the config and the shapes, and may be a skeleton on the meta device.
    """
    if ftype not in _FILE_TYPES:
        raise ValueError(f"ftype must be one of {', '.join(_FILE_TYPES)}, got {ftype!r}")
    config = model.config
    arch = architecture_for(model)
    vocab = tokenizer_metadata(tokenizer, config.vocab_size, hints)
    shapes = layer_shapes(model) if arch is _PER_LAYER else None

    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    try:
        _add_hyperparameters(writer, config, _FILE_TYPES[ftype], model.name_or_path or "srcr-export", shapes)
        vocab.add_to_gguf(writer)
        jobs: list[_Tensor] = []
        rope_freqs = _add_rope(writer, config)
        if rope_freqs is not None:
            name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
            jobs.append(_Tensor(name, rope_freqs.shape, rope_freqs.dtype, rope_freqs.nbytes, None, lambda: rope_freqs))
        names = _weight_tensors(model, weights or ModuleTensors(model), arch, ftype, codes or {}, jobs)
        for job in jobs:
            writer.add_tensor_info(job.name, job.shape, job.dtype, job.nbytes, raw_dtype=job.raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for job in jobs:
            writer.write_tensor_data(job.read())
    finally:
        writer.close()
    return names


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its header entry, and how to read its data when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    nbytes: int
    raw_dtype: gguf.GGMLQuantizationType | None
    read: Callable[[], np.ndarray]


def _add_hyperparameters(
    writer: gguf.GGUFWriter, config: Any, file_type: int, name: str, shapes: list[tuple[int, int, int]] | None
) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(str(name)).name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    head_dim = head_dim_of(config)
    if shapes is None:
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    else:
        writer.add_feed_forward_length([ffn for ffn, _, _ in shapes])
        writer.add_head_count([heads for _, heads, _ in shapes])
        writer.add_head_count_kv([kv for _, _, kv in shapes])
    if shapes is not None or head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def rope_parameters(config: PretrainedConfig) -> dict[str, Any]:
    """RoPE settings from `config.rope_parameters` (transformers 5) or the older top-level fields."""
    params = getattr(config, "rope_parameters", None)
    merged = dict(params) if isinstance(params, dict) else {}
    if not merged:
        merged.update(getattr(config, "rope_scaling", None) or {})
        merged.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "rope_theta" not in merged:
        raise SrcrError("this model uses per-layer rope settings, which the GGUF target does not convert")
    merged.setdefault("rope_type", merged.get("type") or "default")
    return merged


def _add_rope(writer: gguf.GGUFWriter, config: Any) -> np.ndarray | None:
    """Write the rope keys; return the per-frequency factor tensor llama3 scaling needs, if any."""
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "default":
        return None
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return None
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        return None
    if kind == "llama3":
        return llama3_rope_factors(rope, head_dim_of(config))
    raise SrcrError(f"rope type {kind!r} is not supported by the GGUF target (default, linear, yarn, llama3 are)")


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama-3.1 frequency-dependent scaling as factors that llama.cpp divides each frequency by."""
    factor = float(rope["factor"])
    low_factor = float(rope["low_freq_factor"])
    high_factor = float(rope["high_freq_factor"])
    original_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    wavelen = 2 * math.pi / freqs
    smooth = (original_ctx / wavelen - low_factor) / (high_factor - low_factor)
    factors = 1.0 / ((1 - smooth) / factor + smooth)
    factors = np.where(wavelen < original_ctx / high_factor, 1.0, factors)
    factors = np.where(wavelen > original_ctx / low_factor, factor, factors)
    return factors.astype(np.float32)


def interleave_rope_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


_ROPE_ROWS = ("attn_q.weight", "attn_q.bias", "attn_k.weight", "attn_k.bias")


def _weight_tensors(
    model: Any,
    weights: TensorSource,
    arch: ArchitectureSpec,
    ftype: str,
    codes: Mapping[str, BlockCodes],
    jobs: list[_Tensor],
) -> dict[str, str]:
    config = model.config
    name_map = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    head_dim = head_dim_of(config)
    tied = _embeddings_tied(model)
    names: dict[str, str] = {}
    for hf_name, meta in model.state_dict().items():
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SrcrError(
                f"no GGUF tensor name for {hf_name!r}; the GGUF target converts only the standard "
                f"{', '.join(SUPPORTED_ARCHITECTURES)} layouts"
            )
        if tied and gguf_name == "output.weight":
            # llama.cpp reuses token_embd when output.weight is absent; its imatrix entry (the
            # inputs of the output projection) then belongs to token_embd.
            names[hf_name] = "token_embd.weight"
            continue
        names[hf_name] = gguf_name
        # Per head: the heads of this very layer (structured pruning may leave layers with different counts).
        heads = meta.shape[0] // head_dim if arch.permute_qk and gguf_name.endswith(_ROPE_ROWS) else None
        shape = tuple(meta.shape)
        if hf_name in codes:
            quantized = codes[hf_name]
            block, type_size = gguf.GGML_QUANT_SIZES[GGML_TYPES[quantized.grid]]
            byte_shape = (*shape[:-1], shape[-1] // block * type_size)
            read = functools.partial(_packed, quantized, heads)
            jobs.append(
                _Tensor(
                    gguf_name, byte_shape, np.dtype(np.uint8), math.prod(byte_shape), GGML_TYPES[quantized.grid], read
                )
            )
            continue
        # llama.cpp keeps norms and biases in F32 whatever the file type.
        kind = ftype if len(shape) >= 2 else "F32"
        dtype, raw_dtype = _STORED[kind]
        stored_shape = (*shape[:-1], shape[-1] * 2) if kind == "BF16" else shape
        read = functools.partial(_converted, weights, hf_name, kind, heads)
        jobs.append(_Tensor(gguf_name, stored_shape, dtype, math.prod(stored_shape) * dtype.itemsize, raw_dtype, read))
    return names


# File type of a tensor -> (numpy dtype handed to gguf-py, raw ggml type). BF16 goes as its bytes.
_STORED = {
    "F32": (np.dtype(np.float32), None),
    "F16": (np.dtype(np.float16), None),
    "BF16": (np.dtype(np.uint8), gguf.GGMLQuantizationType.BF16),
}


def _converted(weights: TensorSource, name: str, kind: str, heads: int | None) -> np.ndarray:
    tensor = weights.get(name).detach().cpu()
    if kind == "BF16":
        data = tensor.to(torch.bfloat16).view(torch.int16).numpy()
    else:
        data = tensor.to(torch.float32).numpy()
        if kind == "F16":
            data = data.astype(np.float16)
    if heads is not None:
        data = interleave_rope_rows(data, heads)
    data = np.ascontiguousarray(data)
    return data.view(np.uint8) if kind == "BF16" else data


def _packed(quantized: BlockCodes, heads: int | None) -> np.ndarray:
    if heads is not None:
        quantized = quantized.map_rows(lambda rows: interleave_rope_rows(rows, heads))
    return pack(quantized)


def _embeddings_tied(model: Any) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight
