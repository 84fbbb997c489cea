"""Removing structure from a Llama-style decoder in place: layers, FFN channels, KV groups.

Each function keeps the model runnable by transformers: modules are replaced by smaller ones, the
config says what is uniform, and attention layers keep their place in the KV cache. Only what the
Llama family's modules hold is touched (q/k/v/o_proj, gate/up/down_proj); anything else is refused
by `check_layout` before the first change.
"""

from __future__ import annotations

import torch
from torch import nn

from srcr.base.errors import SrcrError


def head_dim(attention: nn.Module) -> int:
    return int(attention.head_dim)


def check_layout(layer: nn.Module) -> None:
    """The decoder layer holds what structured pruning removes from."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = [(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")]
    needed += [(mlp, name) for name in ("gate_proj", "up_proj", "down_proj")]
    missing = [name for owner, name in needed if not isinstance(getattr(owner, name, None), nn.Linear)]
    if missing or not hasattr(attention, "head_dim"):
        raise SrcrError(
            f"structured pruning needs Llama-style layers (q/k/v/o_proj and gate/up/down_proj as nn.Linear); "
            f"{type(layer).__name__} lacks {', '.join(missing) or 'head_dim'}: drop the structured options"
        )


def kv_groups(layer: nn.Module) -> tuple[int, int]:
    """(KV heads, query heads per KV head) of a layer, from its weights."""
    attention = layer.self_attn
    dim = head_dim(attention)
    kv = attention.k_proj.out_features // dim
    return kv, attention.q_proj.out_features // dim // kv


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _rows(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    return _linear(linear.weight[keep], None if linear.bias is None else linear.bias[keep])


def _columns(linear: nn.Linear, keep: torch.Tensor, compensation: torch.Tensor | None) -> nn.Linear:
    """`linear` reading only the kept input columns; `compensation` is added to its bias (created if needed)."""
    bias = linear.bias
    if compensation is not None:
        bias = compensation.to(linear.weight.dtype) + (0 if bias is None else bias)
    return _linear(linear.weight[:, keep], bias)


def removed_contribution(linear: nn.Linear, removed: torch.Tensor, mean_input: torch.Tensor) -> torch.Tensor:
    """What the removed input columns contribute on average: W[:, removed] · E[x_removed] (FLAP's bias)."""
    return linear.weight[:, removed].float() @ mean_input[removed].float()


@torch.no_grad()
def shrink_ffn(layer: nn.Module, keep: torch.Tensor, mean_input: torch.Tensor | None = None) -> None:
    """Keep FFN channels `keep` (sorted indices): gate/up rows and down_proj columns; with `mean_input`
    (the down_proj input's mean per channel), the removed channels' mean output becomes down_proj's bias."""
    mlp = layer.mlp
    channels = mlp.down_proj.in_features
    removed = _complement(keep, channels)
    compensation = None if mean_input is None else removed_contribution(mlp.down_proj, removed, mean_input)
    mlp.gate_proj = _rows(mlp.gate_proj, keep)
    mlp.up_proj = _rows(mlp.up_proj, keep)
    mlp.down_proj = _columns(mlp.down_proj, keep, compensation)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


@torch.no_grad()
def shrink_attention(layer: nn.Module, keep_groups: torch.Tensor, mean_input: torch.Tensor | None = None) -> None:
    """Keep KV groups `keep_groups` (sorted): each group's key and value head, its query heads, and their
    o_proj columns, so grouped-query attention stays valid. `mean_input` as for `shrink_ffn` (o_proj input)."""
    attention = layer.self_attn
    dim = head_dim(attention)
    groups, per_group = kv_groups(layer)
    kv_rows = (keep_groups[:, None] * dim + torch.arange(dim, device=keep_groups.device)).reshape(-1)
    q_heads = (keep_groups[:, None] * per_group + torch.arange(per_group, device=keep_groups.device)).reshape(-1)
    q_rows = (q_heads[:, None] * dim + torch.arange(dim, device=keep_groups.device)).reshape(-1)
    removed = _complement(q_rows, attention.o_proj.in_features)
    compensation = None if mean_input is None else removed_contribution(attention.o_proj, removed, mean_input)
    attention.q_proj = _rows(attention.q_proj, q_rows)
    attention.k_proj = _rows(attention.k_proj, kv_rows)
    attention.v_proj = _rows(attention.v_proj, kv_rows)
    attention.o_proj = _columns(attention.o_proj, q_rows, compensation)
    for name, value in (("num_heads", len(q_heads)), ("num_key_value_heads", len(keep_groups))):
        if hasattr(attention, name):
            setattr(attention, name, value)


def _complement(keep: torch.Tensor, size: int) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=keep.device)
    mask[keep] = False
    return torch.nonzero(mask).flatten()


def remove_layers(model: nn.Module, layers: nn.ModuleList, removed: list[int]) -> None:
    """Drop decoder layers; the rest are renumbered for the KV cache and the config."""
    if len(removed) >= len(layers):
        raise SrcrError("removing every decoder layer leaves no model; lower --drop-layers")
    kept = [index for index in range(len(layers)) if index not in set(removed)]
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    remaining = nn.ModuleList([layers[index] for index in kept])
    for position, layer in enumerate(remaining):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    model.model.layers = remaining
    config.num_hidden_layers = len(kept)
    if layer_types:
        config.layer_types = [layer_types[index] for index in kept]


def record_widths(model: nn.Module, head_dim_value: int) -> None:
    """Put uniform widths into the config (what the GGUF converter and ONNX exporter read); per-layer
    widths stay in the modules, and the config keeps the largest."""
    layers = model.model.layers
    config = model.config
    ffn = {layer.mlp.down_proj.in_features for layer in layers}
    heads = {layer.self_attn.q_proj.out_features // head_dim_value for layer in layers}
    kv = {layer.self_attn.k_proj.out_features // head_dim_value for layer in layers}
    config.head_dim = head_dim_value
    config.intermediate_size = max(ffn)
    config.num_attention_heads = max(heads)
    config.num_key_value_heads = max(kv)


def parameter_count(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())
