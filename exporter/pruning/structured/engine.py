"""Structured pruning of a Llama-style causal LM in place: depth first, then width.

The layer-by-layer plumbing is the unstructured driver's (`capture_layer_inputs`, `run_layer`): one
decoder layer at a time on the device. Scores come from the dense model (the width statistics are
collected with every layer still whole, as FLAP does), then the structure is removed in one go.
Afterwards the pipeline runs the ordinary calibration pass on the smaller model, which collects the
importance matrix for its new shapes (and applies any unstructured or N:M pruning on top).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from srcr.base.progress import ProgressFn, no_progress
from srcr.exporter.pruning.driver import InMemory, capture_layer_inputs, decoder_layers, inference_setup, run_layer
from srcr.exporter.pruning.structured import depth, surgery, width
from srcr.exporter.pruning.structured.spec import LayerWidths, StructureReport, StructureSpec, check_structure


def prune_structure(
    model: nn.Module,
    calib_ids: torch.Tensor,
    spec: StructureSpec,
    device: str = "cpu",
    progress: ProgressFn = no_progress,
) -> StructureReport:
    check_structure(spec)
    layers = decoder_layers(model)
    for layer in layers:
        surgery.check_layout(layer)
    started = time.perf_counter()
    before = surgery.parameter_count(model)
    head_dim = surgery.head_dim(layers[0].self_attn)
    kv_before, per_group = surgery.kv_groups(layers[0])
    ffn_before = layers[0].mlp.down_proj.in_features
    original = len(layers)
    target = torch.device(device)
    removed: list[int] = []
    scores: list[float] = []
    notes: list[str] = []
    with torch.no_grad(), inference_setup(model):
        if spec.drop_layers > 0:
            count = depth.layers_to_drop(spec.drop_layers, len(layers))
            if spec.depth_method == "bi":
                scores = _block_influence(model, layers, calib_ids, target, progress)
                removed = sorted(sorted(range(len(layers)), key=lambda index: scores[index])[:count])
            else:
                removed, scores = depth.sleb_order(model, calib_ids, count, spec.sleb_samples, progress)
                removed = sorted(removed)
            surgery.remove_layers(model, layers, removed)
        if spec.width:
            layers = decoder_layers(model)
            statistics = _width_statistics(model, layers, calib_ids, target, progress)
            notes += _remove_width(layers, statistics, spec, head_dim, per_group)
            surgery.record_widths(model, head_dim)
    source_layers = [index for index in range(original) if index not in set(removed)]
    final = decoder_layers(model)
    widths = [
        LayerWidths(
            layer=position,
            source_layer=source,
            ffn=layer.mlp.down_proj.in_features,
            heads=layer.self_attn.q_proj.out_features // head_dim,
            kv_heads=layer.self_attn.k_proj.out_features // head_dim,
        )
        for position, (source, layer) in enumerate(zip(source_layers, final, strict=True))
    ]
    return StructureReport(
        removed_layers=removed,
        layer_scores=[float(score) for score in scores],
        widths=widths,
        parameters_before=before,
        parameters_after=surgery.parameter_count(model),
        ffn_before=ffn_before,
        kv_heads_before=kv_before,
        heads_before=kv_before * per_group,
        notes=notes,
        seconds=time.perf_counter() - started,
    )


def _block_influence(
    model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, target: torch.device, progress: ProgressFn
) -> list[float]:
    inputs, layer_kwargs = capture_layer_inputs(model, layers, calib_ids, target)
    scores = []
    home = InMemory(model)
    for index, layer in enumerate(layers):
        home.onload(index, layer, target)
        outputs = run_layer(layer, inputs, layer_kwargs[index])
        home.offload(index, layer)
        scores.append(depth.block_influence(inputs, outputs))
        inputs = outputs
        progress(f"block influence layer {index + 1}/{len(layers)}", index + 1, len(layers))
    return scores


def _width_statistics(
    model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, target: torch.device, progress: ProgressFn
) -> list[dict[str, width.ChannelStatistics]]:
    """Per layer: the statistics of o_proj's and down_proj's inputs, on the dense propagation."""
    inputs, layer_kwargs = capture_layer_inputs(model, layers, calib_ids, target)
    collected = []
    home = InMemory(model)
    for index, layer in enumerate(layers):
        home.onload(index, layer, target)
        statistics = {
            "attention": width.ChannelStatistics(layer.self_attn.o_proj.in_features),
            "ffn": width.ChannelStatistics(layer.mlp.down_proj.in_features),
        }
        handles = [
            layer.self_attn.o_proj.register_forward_pre_hook(_recorder(statistics["attention"])),
            layer.mlp.down_proj.register_forward_pre_hook(_recorder(statistics["ffn"])),
        ]
        try:
            inputs = run_layer(layer, inputs, layer_kwargs[index])
        finally:
            for handle in handles:
                handle.remove()
        home.offload(index, layer)
        collected.append(statistics)
        progress(f"width statistics layer {index + 1}/{len(layers)}", index + 1, len(layers))
    return collected


def _recorder(statistics: width.ChannelStatistics) -> Any:
    def hook(module: nn.Module, args: tuple) -> None:
        statistics.add(args[0].detach())

    return hook


def _remove_width(
    layers: nn.ModuleList,
    statistics: list[dict[str, width.ChannelStatistics]],
    spec: StructureSpec,
    head_dim: int,
    per_group: int,
) -> list[str]:
    method, notes = spec.width_method, []
    compensate = method == "flap"
    if spec.ffn_ratio > 0:
        scores = [
            width.channel_scores(method, layer.mlp.down_proj.weight, stats["ffn"])
            for layer, stats in zip(layers, statistics, strict=True)
        ]
        channels = len(scores[0])
        target_keep = channels * (1 - spec.ffn_ratio)
        if spec.allocation == "uniform":
            keep = width.round_to_multiple(target_keep, spec.multiple, spec.multiple, channels)
            selection = width.keep_uniform(scores, keep)
        else:
            total = round(target_keep * len(layers))
            units = [width.standardized(layer_scores) for layer_scores in scores]
            selection = width.keep_global(scores, total, spec.multiple, spec.multiple, units)
        kept = sum(len(indices) for indices in selection.keep)
        achieved = 1 - kept / (channels * len(layers))
        if spec.multiple > 1 or abs(achieved - spec.ffn_ratio) > 1e-9:
            notes.append(
                f"FFN widths are multiples of {spec.multiple}: asked to remove {spec.ffn_ratio:.1%} of the "
                f"channels, removed {achieved:.1%}"
            )
        for layer, stats, keep_indices in zip(layers, statistics, selection.keep, strict=True):
            surgery.shrink_ffn(layer, keep_indices, stats["ffn"].mean if compensate else None)
    if spec.head_ratio > 0:
        groups = surgery.kv_groups(layers[0])[0]
        channels_per_group = per_group * head_dim
        channel = [
            width.channel_scores(method, layer.self_attn.o_proj.weight, stats["attention"])
            for layer, stats in zip(layers, statistics, strict=True)
        ]
        scores = [width.group_scores(method, layer_scores, channels_per_group) for layer_scores in channel]
        keep_groups = max(1, groups - round(spec.head_ratio * groups))
        if spec.allocation == "uniform":
            selection = width.keep_uniform(scores, keep_groups)
        else:
            units = [
                width.standardized(layer_scores).reshape(-1, channels_per_group).mean(1) for layer_scores in channel
            ]
            selection = width.keep_global(scores, keep_groups * len(layers), 1, 1, units)
        kept = sum(len(indices) for indices in selection.keep)
        achieved = 1 - kept / (groups * len(layers))
        if abs(achieved - spec.head_ratio) > 1e-9:
            notes.append(
                f"attention is removed in whole KV groups ({groups} per layer, {per_group} query heads each): "
                f"asked to remove {spec.head_ratio:.1%}, removed {achieved:.1%}"
            )
        for layer, stats, keep_indices in zip(layers, statistics, selection.keep, strict=True):
            surgery.shrink_attention(layer, keep_indices, stats["attention"].mean if compensate else None)
    return notes
