"""The .onnx artifact: what is stored beside the graph, how it is written, and where its bytes go.

Layout: one self-contained .onnx file. The tokenizer (tokenizer.json, zlib-compressed and base64
encoded: 1.5 MB -> 0.5 MB for SmolLM2, a visible share of a 4-bit 135M model) and the few model facts
the runtime needs (end-of-sequence ids, cache shape) are metadata_props entries, so the device needs
only this file, onnxruntime and the `tokenizers` library. Graphs over protobuf's 2 GB limit keep
their tensors in one external data file beside the .onnx (`<name>.data`).
"""

from __future__ import annotations

import base64
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import SrcrError

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


def end_of_sequence_ids(model: Any, tokenizer: Any) -> list[int]:
    """Same rule as the torch reference runtime: generation config first, then the tokenizer."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


def prepended_bos(tokenizer: Any) -> int | None:
    """The BOS id if the tokenizer opens plain text with it (the evaluators prepend it themselves)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and with_special[:1] == [bos] else None


@dataclass(frozen=True)
class ModelFacts:
    eos_token_ids: list[int]
    bos_token_id: int | None
    vocab_size: int
    layers: int
    kv_heads: int
    head_dim: int
    architecture: str

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> ModelFacts:
        return cls(**json.loads(text))


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


def external_data_name(out: Path, hints: dict[str, Any] | None) -> str:
    """`<final artifact name>.data` when the caller says what the final name is, else `<out name>.data`."""
    final_name = (hints or {}).get("artifact_name") or Path(out).name
    return f"{final_name}.data"


def save_model(model: Any, out: Path, hints: dict[str, Any] | None) -> Path | None:
    """Write `model` to `out`; return the external data file when the graph is too large for one file."""
    import onnx

    out = Path(out)
    if sum(tensor_bytes(model).values()) < EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(out))
        return None
    data = out.parent / external_data_name(out, hints)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model,
        str(out),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
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
