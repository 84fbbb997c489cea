"""The .onnx artifact: what is stored beside the graph, how it is written, and where its bytes go.

Layout: one self-contained .onnx file. The tokenizer (tokenizer.json, zlib-compressed and base64
encoded: 1.5 MB -> 0.5 MB for SmolLM2, a visible share of a 4-bit 135M model) and the few model facts
the runtime needs (end-of-sequence ids, cache shape) are metadata_props entries, so the device needs
only this file, onnxruntime and the `tokenizers` library. Graphs over protobuf's 2 GB limit keep
their tensors in one external data file beside the .onnx (`<name>.data`).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError

TOKENIZER_KEY = "srcr.tokenizer_json.zlib.base64"
MODEL_KEY = "srcr.model"
QUANTIZATION_KEY = "srcr.quantization"
FORMAT_KEY = "srcr.format"
# Protobuf refuses messages of 2 GiB; stay clear of it (graph structure and metadata add to the tensors).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def tokenizer_json(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SrcrError(
            "the ONNX target stores a fast (tokenizers) tokenizer in the artifact, but this model's tokenizer "
            "is a slow one; convert it with `AutoTokenizer.from_pretrained(..., use_fast=True)` or use --format gguf"
        )
    return backend.to_str()


def encode_tokenizer(text: str) -> str:
    return base64.b64encode(zlib.compress(text.encode("utf-8"), 9)).decode("ascii")


def decode_tokenizer(stored: str) -> str:
    return zlib.decompress(base64.b64decode(stored)).decode("utf-8")


@dataclass(frozen=True)
class ModelFacts:
    eos_token_ids: list[int]
    bos_token_id: int | None
    vocab_size: int
    layers: int
    kv_heads: int | list[int]  # one count, or one per layer
    head_dim: int
    architecture: str
    context_length: int | None = None  # the longest sequence the graph computes exactly (length-dependent RoPE)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> ModelFacts:
        """The facts stored in an artifact; anything malformed (a foreign or crafted file) is a SrcrError."""
        import pydantic

        try:
            facts = pydantic.TypeAdapter(cls).validate_json(text, strict=True)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "facts"
            raise SrcrError(
                f"the artifact's model facts are malformed ({where}: {first['msg']}); re-export it"
            ) from None
        counts = facts.kv_heads if isinstance(facts.kv_heads, list) else [facts.kv_heads] * facts.layers
        sizes = [facts.vocab_size, facts.layers, facts.head_dim, *counts, facts.context_length or 1]
        if min(sizes) < 1 or len(counts) != facts.layers:
            raise SrcrError("the artifact's model facts hold a non-positive or inconsistent size; re-export it")
        return dataclasses.replace(facts, kv_heads=counts)


def attach_metadata(
    model: Any, facts: ModelFacts, stored_tokenizer: str, quantization: dict[str, Any], format_info: dict[str, Any]
) -> None:
    from onnx import helper

    model.producer_name = "srcr"
    entries = {
        TOKENIZER_KEY: stored_tokenizer,  # from encode_tokenizer
        MODEL_KEY: facts.to_json(),
        QUANTIZATION_KEY: json.dumps(quantization),
        FORMAT_KEY: json.dumps(format_info),
    }
    kept = [prop for prop in model.metadata_props if prop.key not in entries]
    model.ClearField("metadata_props")
    model.metadata_props.extend(kept)
    helper.set_model_props(model, {**{prop.key: prop.value for prop in kept}, **entries})


def tensor_bytes(model: Any) -> dict[str, int]:
    """Stored bytes of every initializer, by name."""
    from onnx import numpy_helper

    sizes = {}
    for tensor in model.graph.initializer:
        sizes[tensor.name] = len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes
    return sizes


def external_data_name(out: Path, hints: Mapping[str, object] | None) -> str:
    """`<final artifact name>.data` when the caller says what the final name is, else `<out name>.data`."""
    final_name = (hints or {}).get("artifact_name") or Path(out).name
    return f"{final_name}.data"


def save_model(model: Any, out: Path, workdir: Path, hints: Mapping[str, object] | None) -> Path | None:
    """Write `model` to `out`; return the external data file when the graph is too large for one file.

    The data file's name is recorded inside the graph, so it is written under its final name in
    `workdir` and moved beside `out` complete: a killed export never leaves a half-written one.
    """
    import onnx

    out = Path(out)
    if sum(tensor_bytes(model).values()) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(out))
        return None
    name = external_data_name(out, hints)
    staged = Path(workdir) / "external"
    staged.mkdir(exist_ok=True)
    onnx.save_model(
        model,
        str(staged / out.name),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=name,
        size_threshold=1024,
    )
    data = out.parent / name
    os.replace(staged / name, data)
    os.replace(staged / out.name, out)
    return data


def bytes_by_kind(
    sizes: dict[str, int],
    artifact_bytes: int,
    embedding_names: list[str],
    linear_names: list[str],
    tokenizer_bytes: int,
) -> dict[str, int]:
    """Split the artifact's bytes: token embedding (with a tied lm_head), linear weights, tokenizer, the rest."""

    def owned(tensor: str, weights: list[str]) -> bool:
        return any(tensor == weight or tensor.startswith((f"{weight}.", f"{weight}_")) for weight in weights)

    embedding = sum(size for name, size in sizes.items() if owned(name, embedding_names))
    matmul = sum(
        size
        for name, size in sizes.items()
        if not owned(name, embedding_names) and (owned(name, linear_names) or name.startswith("block_sum."))
    )
    return {
        "embedding": embedding,
        "matmul_weights": matmul,
        "tokenizer": tokenizer_bytes,
        "other": artifact_bytes - embedding - matmul - tokenizer_bytes,
    }


def weight_tensor_bytes(sizes: dict[str, int], weights: list[str]) -> int:
    """Bytes of everything stored for `weights`: levels, scales, zero points and offsets, or the floats."""
    return sum(
        size
        for name, size in sizes.items()
        if any(name == weight or name.startswith((f"{weight}.", f"{weight}_")) for weight in weights)
    )
