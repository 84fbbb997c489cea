"""The seam every pruning method plugs into: observe calibration inputs, then solve once.

A method works on one group of linears at a time, as the IST-DASLab reference solvers do; the
layer-by-layer plumbing (capturing inputs, moving layers to the device, the importance matrix) is
the driver's. Adding a method is one module with a `PruningMethod` subclass and one line in
registry.py (docs/architecture.md walks through it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import nn

from srcr.base.grids import BlockCodes
from srcr.exporter.pruning.spec import PruneSpec
from srcr.exporter.pruning.stats import InputStatistics

# Groupings a method may declare (the driver implements each):
# "shared_input": linears that read the very same tensor (q/k/v; gate/up) form one group and are
# pruned as one stack of rows; every other linear is a group of its own.
SHARED_INPUT = "shared_input"


class PruningMethod(ABC):
    """One algorithm for one group of linears. Weights are changed in place, and only in `prune`."""

    summary: ClassVar[str]  # one line for --help and the docs
    grouping: ClassVar[str] = SHARED_INPUT
    uses_calibration: ClassVar[bool] = True  # False: the weights alone decide (the statistics pass still runs)

    def __init__(self, linears: dict[str, nn.Linear], spec: PruneSpec, statistics: InputStatistics) -> None:
        self.linears = linears
        self.spec = spec
        self.statistics = statistics  # the group's mean squared input, kept up to date by the driver
        # Filled by `prune` when it rounds onto a format's grid (spec.grid), per linear name: the codes to
        # write, and which weights were pruned (a weight can also round to zero without being pruned).
        self.codes: dict[str, BlockCodes] = {}
        self.pruned: dict[str, torch.Tensor] = {}

    @classmethod
    def check(cls, spec: PruneSpec) -> None:
        """Refuse options this method cannot honour, before any model is loaded."""
        return None

    def observe(self, inputs: torch.Tensor) -> None:
        """Accumulate what the solve needs from one batch of the group's inputs, float32 [tokens, in_features]."""
        return None

    @abstractmethod
    def prune(self) -> None:
        """Zero weights of `self.linears` in place, once every calibration batch was observed."""

    def stacked_weight(self) -> torch.Tensor:
        """float32 [sum of out_features, in_features]: the group's weights one under the other."""
        return torch.cat([linear.weight.detach().float() for linear in self.linears.values()], dim=0)

    def row_splits(self) -> list[int]:
        return [linear.out_features for linear in self.linears.values()]

    def row_ranges(self) -> dict[str, tuple[int, int]]:
        """Each linear's rows (start, stop) in the stacked weight."""
        ranges, start = {}, 0
        for name, rows in zip(self.linears, self.row_splits(), strict=True):
            ranges[name] = (start, start + rows)
            start += rows
        return ranges

    def write_stacked(self, weight: torch.Tensor) -> None:
        for linear, rows in zip(self.linears.values(), torch.split(weight, self.row_splits(), dim=0), strict=True):
            linear.weight.data.copy_(rows)
