"""Which decoder layers to remove: ShortGPT's block influence, or SLEB's greedy search.

- Block influence (Men et al. 2024, ShortGPT): BI_i = 1 − mean over tokens of cos(h_in, h_out) of
  layer i, on the dense model in one calibration pass; the layers that change their input least go.
- SLEB (Song et al. 2024): remove one layer at a time, each time the one whose removal (on top of
  those already removed) gives the lowest calibration perplexity. Each candidate costs the layers
  after it plus the output projection, per step, so it scores on `sleb_samples` calibration windows
  cut to 512 tokens.
"""

from __future__ import annotations

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


def _loss_from_hidden(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean next-token NLL from the last decoder layer's output: final norm, output projection, loss."""
    total = 0.0
    for sample, states in zip(ids, hidden, strict=True):
        logits = model.get_output_embeddings()(model.model.norm(states[None]))[0, :-1].float()
        total += float(F.cross_entropy(logits, sample[1:].to(logits.device), reduction="sum"))
    return total / (ids.shape[0] * (ids.shape[1] - 1))


def sleb_order(
    model: nn.Module, ids: torch.Tensor, count: int, samples: int, progress: ProgressFn = no_progress
) -> tuple[list[int], list[float]]:
    """(layers removed in order, calibration loss after each removal).

    Each step runs the current model once and keeps the hidden states entering every layer; a
    candidate's removal is then scored from the states entering it, through the layers after it only
    (half the layer evaluations of running the whole model per candidate, the same losses).
    """
    from srcr.exporter.pruning.driver import capture_layer_inputs, run_layer

    ids = ids[:samples, :SLEB_TOKENS]
    layers = model.model.layers
    device = next(model.parameters()).device
    first, layer_kwargs = capture_layer_inputs(model, layers, ids, device)
    removed: list[int] = []
    losses: list[float] = []
    for step in range(count):
        kept = [index for index in range(len(layers)) if index not in removed]
        entering, hidden = {}, first
        for index in kept:
            entering[index] = hidden
            hidden = run_layer(layers[index], hidden, layer_kwargs[index])
        best, best_loss = None, float("inf")
        for position, candidate in enumerate(kept):
            progress(f"sleb: step {step + 1}/{count}", position, len(kept))
            hidden = entering[candidate]
            for index in kept[position + 1 :]:
                hidden = run_layer(layers[index], hidden, layer_kwargs[index])
            loss = _loss_from_hidden(model, hidden, ids)
            if loss < best_loss:
                best, best_loss = candidate, loss
        del entering
        removed.append(best)
        losses.append(best_loss)
        progress(f"sleb: step {step + 1}/{count}", len(kept), len(kept))
    return removed, losses
