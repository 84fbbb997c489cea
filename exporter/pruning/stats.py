"""Running statistics of the input that one or more linears of a decoder layer read.

Linears that read the same tensor (q/k/v, gate/up) share one instance: their inputs are
accumulated once, and their weights are pruned as one stack of rows.
"""

from __future__ import annotations

import torch
from torch import nn

from exporter.pruning.spec import PruneSpec


class InputStatistics:
    """Mean of x_j**2 per input column over all calibration tokens: llama.cpp's importance matrix,
    and Wanda's activation norm (up to a constant). Used alone when nothing is pruned."""

    def __init__(self, linears: dict[str, nn.Linear]):
        first = next(iter(linears.values()))
        self.linears = linears
        self.columns = first.in_features
        self.mean_square = torch.zeros(self.columns, dtype=torch.float32, device=first.weight.device)
        self.tokens = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        x = inp.reshape(-1, self.columns).float()
        self._accumulate(x)
        self.tokens += x.shape[0]

    def _accumulate(self, x: torch.Tensor) -> None:
        # A running mean, as the reference implementations keep their Hessian: no float32 sum grows large.
        total = self.tokens + x.shape[0]
        self.mean_square.mul_(self.tokens / total).add_(x.square().sum(0), alpha=1.0 / total)

    def prune(self, spec: PruneSpec) -> None:
        """Statistics only: nothing to prune."""
        return None

    def stacked_weight(self) -> torch.Tensor:
        """float32 [sum of out_features, in_features]: the group's weights one under the other."""
        return torch.cat([linear.weight.detach().float() for linear in self.linears.values()], dim=0)

    def row_splits(self) -> list[int]:
        return [linear.out_features for linear in self.linears.values()]

    def write_stacked(self, weight: torch.Tensor) -> None:
        for linear, rows in zip(self.linears.values(), torch.split(weight, self.row_splits(), dim=0), strict=True):
            linear.weight.data.copy_(rows)
