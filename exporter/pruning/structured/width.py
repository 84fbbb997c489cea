"""Which FFN channels and KV groups to keep: channel statistics, the two scores, and the selection.

Both scores are computed on the input of a layer's output projection (o_proj for attention, down_proj
for the FFN), whose columns are exactly the channels that structured pruning removes:

- FLAP (An et al. 2024), "WIFV": the fluctuation of each input channel over the calibration tokens
  (its sample variance) times the squared norm of its weight column. A channel whose input barely
  moves can be replaced by its mean, which FLAP adds back as a bias (bias compensation). As in the
  reference, the attention score is squared before it is summed over a head's channels.
- Wanda-sp: Wanda's |W_ij|·‖x_j‖ averaged over the output rows: a channel's weight times its input
  norm, with no bias compensation.

`uniform` keeps the same number of channels (and KV groups) in every layer; `global` standardizes
each layer's scores and ranks all layers' channels together (FLAP's adaptive structure with a fixed
ratio per module kind), so layers that matter more keep more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class ChannelStatistics:
    """Mean and variance of each input channel over calibration tokens (Chan's parallel update, float64)."""

    def __init__(self, channels: int) -> None:
        self.count = 0
        self.mean = torch.zeros(channels, dtype=torch.float64)
        self.m2 = torch.zeros(channels, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double().cpu()
        n = x.shape[0]
        batch_mean = x.mean(0)
        batch_m2 = ((x - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.count = total

    @property
    def variance(self) -> torch.Tensor:
        """The sample variance per channel: FLAP's fluctuation."""
        return self.m2 / max(self.count - 1, 1)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.m2 / max(self.count, 1) + self.mean**2


def channel_scores(method: str, weight: torch.Tensor, statistics: ChannelStatistics) -> torch.Tensor:
    """float64 [in_features]: how much each input channel of an output projection `weight` [out, in] matters."""
    weight = weight.detach().double().cpu()
    if method == "flap":
        return statistics.variance * weight.square().sum(0)
    return weight.abs().mean(0) * statistics.mean_square.sqrt()


def group_scores(method: str, channel: torch.Tensor, channels_per_group: int) -> torch.Tensor:
    """Per KV group: the o_proj channels of its query heads, summed (FLAP squares them first)."""
    values = channel.square() if method == "flap" else channel
    return values.reshape(-1, channels_per_group).sum(1)


def standardized(scores: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit deviation within one layer, so layers can be ranked together."""
    deviation = scores.std()
    return (scores - scores.mean()) / (deviation if deviation > 0 else 1.0)


def round_to_multiple(count: float, multiple: int, low: int, high: int) -> int:
    """`count` to the nearest multiple of `multiple` (halves up: keep more), within [low, high]."""
    rounded = math.floor(count / multiple + 0.5) * multiple
    return max(low, min(high, rounded))


@dataclass(frozen=True)
class Selection:
    keep: list[torch.Tensor]  # per layer: sorted indices kept


def keep_uniform(scores: list[torch.Tensor], keep_count: int) -> Selection:
    """The `keep_count` best-scored units of every layer."""
    return Selection([torch.topk(layer, keep_count).indices.sort().values for layer in scores])


def keep_global(
    scores: list[torch.Tensor], keep_total: int, multiple: int, minimum: int, unit_scores: list[torch.Tensor]
) -> Selection:
    """Rank every layer's standardized `unit_scores` together and keep the best `keep_total`, then round
    each layer's count to `multiple` (at least `minimum`); within a layer the best raw `scores` are kept."""
    flat = torch.cat(unit_scores)
    threshold_index = max(0, min(len(flat), keep_total))
    kept_flags = torch.zeros(len(flat), dtype=torch.bool)
    if threshold_index:
        kept_flags[torch.topk(flat, threshold_index).indices] = True
    counts, start = [], 0
    for layer in unit_scores:
        raw = int(kept_flags[start : start + len(layer)].sum())
        counts.append(round_to_multiple(raw, multiple, minimum, len(layer)))
        start += len(layer)
    return Selection(
        [torch.topk(layer, count).indices.sort().values for layer, count in zip(scores, counts, strict=True)]
    )
