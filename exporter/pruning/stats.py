"""The running statistic every calibration pass keeps: mean of x_j**2 per input column.

It is llama.cpp's importance matrix, and Wanda's activation norm up to a constant. Linears that
read the same tensor (q/k/v, gate/up) share one instance, so their inputs are counted once.
"""

from __future__ import annotations

import torch


class InputStatistics:
    def __init__(self, columns: int, device: torch.device) -> None:
        self.columns = columns
        self.mean_square = torch.zeros(columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """One batch, float32 [tokens, columns]."""
        # A running mean, as the reference implementations keep their Hessian: no float32 sum grows large.
        total = self.tokens + x.shape[0]
        self.mean_square.mul_(self.tokens / total).add_(x.square().sum(0), alpha=1.0 / total)
        self.tokens = total
