"""Which decoder layers to remove: ShortGPT's block influence, or SLEB's greedy search.

- Block influence (Men et al. 2024, ShortGPT): BI_i = 1 − mean over tokens of cos(h_in, h_out) of
  layer i, on the dense model in one calibration pass; the layers that change their input least go.
- SLEB (Song et al. 2024): remove one layer at a time, each time the one whose removal (on top of
  those already removed) gives the lowest calibration perplexity. It runs the model once per
  candidate per step, so it scores on `sleb_samples` calibration windows cut to 512 tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from srcr.base.progress import ProgressFn, no_progress

SLEB_TOKENS = 512


def layers_to_drop(fraction: float, layers: int) -> int:
    """Whole layers: at least one when anything is asked for, and never all of them."""
    if fraction <= 0:
        return 0
    return max(1, min(layers - 1, round(fraction * layers)))


@torch.no_grad()
def block_influence(inputs: torch.Tensor, outputs: torch.Tensor) -> float:
    """1 − mean cosine similarity between a layer's input and output hidden states, over all tokens."""
    similarity = F.cosine_similarity(inputs.double().flatten(0, -2), outputs.double().flatten(0, -2), dim=-1)
    return float(1.0 - similarity.mean())


@contextlib.contextmanager
def without_layers(model: nn.Module, skipped: set[int]) -> Iterator[None]:
    """The model runs as if the `skipped` decoder layers were gone (no KV cache involved)."""
    layers, config = model.model.layers, model.config
    count = config.num_hidden_layers
    model.model.layers = nn.ModuleList([layer for index, layer in enumerate(layers) if index not in skipped])
    config.num_hidden_layers = len(model.model.layers)
    try:
        yield
    finally:
        model.model.layers = layers
        config.num_hidden_layers = count


@torch.no_grad()
def calibration_loss(model: nn.Module, ids: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood over the samples."""
    total, tokens = 0.0, 0
    for sample in ids:
        logits = model(sample[None], use_cache=False).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, sample[1:], reduction="sum"))
        tokens += len(sample) - 1
    return total / tokens


def sleb_order(
    model: nn.Module, ids: torch.Tensor, count: int, samples: int, progress: ProgressFn = no_progress
) -> tuple[list[int], list[float]]:
    """(layers removed in order, calibration loss after each removal)."""
    ids = ids[:samples, :SLEB_TOKENS]
    layers = len(model.model.layers)
    removed: list[int] = []
    losses: list[float] = []
    for step in range(count):
        best, best_loss = None, float("inf")
        candidates = [index for index in range(layers) if index not in removed]
        for position, candidate in enumerate(candidates):
            progress(f"sleb: step {step + 1}/{count}", position, len(candidates))
            with without_layers(model, {*removed, candidate}):
                loss = calibration_loss(model, ids)
            if loss < best_loss:
                best, best_loss = candidate, loss
        removed.append(best)
        losses.append(best_loss)
        progress(f"sleb: step {step + 1}/{count}", len(candidates), len(candidates))
    return removed, losses
