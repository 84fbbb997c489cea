"""Export a decoder-only transformers model to one ONNX graph with an explicit key/value cache.

One graph serves prefill and decode: the past keys/values are graph inputs (length 0 for the first
call) and the updated cache comes back as outputs, so generation never recomputes the prefix.

The model is traced by torch.onnx's TorchScript exporter (`dynamo=False`): on transformers 5 it
exports a Llama-style model in seconds, needs no `dynamic_shapes` for the cache, and the graph it
writes names every node after its module path, which is how linear weights are found again later.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OPSET = 17
EXPORTER = "torch.onnx legacy (TorchScript, dynamo=False)"
# Trace lengths: a non-empty past and a multi-token step, so no shape-dependent branch of the
# attention-mask code is frozen into a special case (decode steps and empty pasts then also work).
_TRACE_PAST, _TRACE_STEP = 3, 5
_WRAPPER_PREFIX = "decoder"


@dataclass(frozen=True)
class CacheShape:
    layers: int
    kv_heads: tuple[int, ...]  # per layer: structured pruning may leave layers with different counts
    head_dim: int

    @classmethod
    def of(cls, model: Any) -> CacheShape:
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        default = getattr(config, "num_key_value_heads", None) or heads
        layers = getattr(getattr(model, "model", None), "layers", None) or []
        kv = [
            layer.self_attn.k_proj.out_features // head_dim
            if hasattr(getattr(layer, "self_attn", None), "k_proj")
            else default
            for layer in layers
        ] or [default] * config.num_hidden_layers
        return cls(len(kv), tuple(kv), head_dim)

    def per_layer(self) -> int | list[int]:
        """One count when every layer has it, else the list (what the artifact's metadata stores)."""
        return self.kv_heads[0] if len(set(self.kv_heads)) == 1 else list(self.kv_heads)


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{layer}.{kind}" for layer in range(layers) for kind in ("key", "value")]


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids", *past_names(layers)]


def output_names(layers: int) -> list[str]:
    return ["logits", *present_names(layers)]


def _dynamic_axes(layers: int) -> dict[str, dict[int, str]]:
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "total_sequence"},
        "position_ids": {0: "batch", 1: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
    }
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in past_names(layers)})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in present_names(layers)})
    return axes


def _cache_wrapper(model: Any) -> Any:
    """An nn.Module taking the cache as flat tensors, since the exporter cannot take a Cache object."""
    import torch
    from transformers import DynamicCache

    class KVCacheDecoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.decoder = model

        def forward(self, input_ids, attention_mask, position_ids, *past):  # noqa: ANN001, ANN202
            # Full-length layers only: a config-built cache trims sliding-window layers to the window, a
            # branch the short trace would freeze; a full layer plus the model's own sliding mask attends
            # to the same keys, at the cost of keeping the older ones.
            cache = DynamicCache()
            for layer in range(len(past) // 2):
                cache.update(past[2 * layer], past[2 * layer + 1], layer)
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return KVCacheDecoder().eval()


def _trace_inputs(model: Any, shape: CacheShape) -> tuple[Any, ...]:
    import torch

    device = next(model.parameters()).device
    total = _TRACE_PAST + _TRACE_STEP
    input_ids = torch.zeros((1, _TRACE_STEP), dtype=torch.long, device=device)
    attention_mask = torch.ones((1, total), dtype=torch.long, device=device)
    position_ids = torch.arange(_TRACE_PAST, total, dtype=torch.long, device=device)[None]
    past = [
        torch.zeros((1, shape.kv_heads[layer], _TRACE_PAST, shape.head_dim), dtype=torch.float32, device=device)
        for layer in range(shape.layers)
        for _ in ("key", "value")
    ]
    return (input_ids, attention_mask, position_ids, *past)


@contextlib.contextmanager
def _tracing_mode(model: Any) -> Iterator[None]:
    """Eval mode and the KV cache on for the trace; the caller's settings come back afterwards."""
    was_training, use_cache = model.training, getattr(model.config, "use_cache", True)
    model.eval()
    model.config.use_cache = True
    try:
        yield
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)


def rope_context_limit(config: Any) -> int | None:
    """The longest sequence the traced graph computes exactly, when the model's RoPE depends on length.

    Longrope (Phi-3.5, Phi-4-mini) switches to its long factors past `original_max_position_embeddings`,
    and dynamic NTK rescales past `max_position_embeddings`; the trace records the short-sequence branch,
    so the artifact is exact up to that length and its runtime refuses longer sequences.
    """
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    per_layer_type = bool(params) and all(isinstance(value, dict) for value in params.values())
    settings = list(params.values()) if per_layer_type else [params]
    limits = []
    for rope in settings:
        kind = str(rope.get("rope_type") or rope.get("type") or "default")
        if kind == "longrope":
            limits.append(int(rope.get("original_max_position_embeddings") or config.original_max_position_embeddings))
        elif "dynamic" in kind:
            limits.append(int(rope.get("original_max_position_embeddings") or config.max_position_embeddings))
    return min(limits) if limits else None


@contextlib.contextmanager
def _short_sequence_rope(model: Any) -> Iterator[None]:
    """Length-dependent RoPE traced as its short-sequence case: rotary modules report a static type (their
    update writes a buffer in place, which the exporter cannot express) and start from their original
    frequencies; everything comes back afterwards."""
    saved = []
    for module in model.modules():
        rope_type, original = getattr(module, "rope_type", None), getattr(module, "original_inv_freq", None)
        if not isinstance(rope_type, str) or original is None or not hasattr(module, "inv_freq"):
            continue
        if rope_type == "longrope" or "dynamic" in rope_type:
            saved.append((module, rope_type, module.inv_freq.clone()))
            module.rope_type = "default"
            module.inv_freq.copy_(original)
    try:
        yield
    finally:
        for module, rope_type, inv_freq in saved:
            module.rope_type = rope_type
            module.inv_freq.copy_(inv_freq)


def export_decoder(model: Any, onnx_path: Path) -> Any:
    """Trace `model` (fp32) to `onnx_path` (external data beside it if large); return the loaded ModelProto."""
    import onnx
    import torch

    shape = CacheShape.of(model)
    layers = shape.layers
    with _tracing_mode(model), _short_sequence_rope(model), torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python branch on tensor shapes; the trace inputs are chosen so
        # that the general branch is the one recorded.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _cache_wrapper(model),
            _trace_inputs(model, shape),
            str(onnx_path),
            input_names=input_names(layers),
            output_names=output_names(layers),
            dynamic_axes=_dynamic_axes(layers),
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    return onnx.load(str(onnx_path))


def module_path(node_name: str) -> str | None:
    """'/decoder/model/layers.0/mlp/up_proj/MatMul' -> 'model.layers.0.mlp.up_proj'."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 3 or parts[0] != _WRAPPER_PREFIX:
        return None
    return ".".join(parts[1:-1])


@dataclass
class WeightMap:
    """Where the model's weight matrices ended up in the graph, under their Hugging Face names."""

    linear: dict[str, str]  # HF weight name ("model.layers.0.mlp.up_proj.weight") -> MatMul node name
    embedding: str | None  # HF name of the token embedding, when a Gather reads it from an initializer
    lm_head: str | None  # HF name of the output projection, when it is one of the MatMuls
    tied: bool  # the embedding and the output projection are one tensor in the model


def _weight_name(model: Any, module: Any) -> str | None:
    return next((f"{name}.weight" for name, candidate in model.named_modules() if candidate is module), None)


def name_weights(graph: Any, model: Any) -> WeightMap:
    """Rename the linear-layer and embedding initializers to their HF weight names.

    The exporter folds each nn.Linear's transpose into an anonymous initializer ('onnx::MatMul_123',
    stored [in, out]); the HF name makes quantized tensors, bytes per kind and imatrix keys traceable.
    """
    import torch

    linear_modules = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    input_embeddings, output_embeddings = model.get_input_embeddings(), model.get_output_embeddings()
    embedding_name = _weight_name(model, input_embeddings)
    initializers = {tensor.name for tensor in graph.initializer}
    renames: dict[str, str] = {}
    linear: dict[str, str] = {}
    embedding = None
    for node in graph.node:
        path = module_path(node.name)
        if node.op_type == "MatMul" and path in linear_modules and node.input[1] in initializers:
            renames[node.input[1]] = f"{path}.weight"
            linear[f"{path}.weight"] = node.name
        elif node.op_type == "Gather" and node.input[0] in initializers and f"{path}.weight" == embedding_name:
            renames[node.input[0]] = embedding_name
            embedding = embedding_name
    _rename_initializers(graph, renames)
    lm_head = _weight_name(model, output_embeddings) if output_embeddings is not None else None
    lm_head = lm_head if lm_head in linear else None
    tied = (
        embedding is not None
        and lm_head is not None
        and output_embeddings.weight.data_ptr() == input_embeddings.weight.data_ptr()
    )
    return WeightMap(linear=linear, embedding=embedding, lm_head=lm_head, tied=tied)


def _rename_initializers(graph: Any, renames: dict[str, str]) -> None:
    for tensor in graph.initializer:
        if tensor.name in renames:
            tensor.name = renames[tensor.name]
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in renames:
                node.input[index] = renames[name]
