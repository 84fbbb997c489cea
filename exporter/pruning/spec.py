"""What to prune and what pruning did: the request, its validation, and the report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from exporter.errors import SrcrError

METHODS = ("magnitude", "wanda", "sparsegpt")
_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class PruneSpec:
    method: str  # "magnitude" | "wanda" | "sparsegpt"
    sparsity: float  # unstructured fraction in [0, 1); ignored when pattern is set
    pattern: tuple[int, int] | None = None  # (n, m): n of every m consecutive input weights zeroed
    block_size: int = 128  # SparseGPT lazy-update block
    percdamp: float = 0.01  # SparseGPT Hessian dampening

    @property
    def target_sparsity(self) -> float:
        if self.pattern is not None:
            n, m = self.pattern
            return n / m
        return float(self.sparsity)


@dataclass
class PruneReport:
    per_layer: list[dict]  # {"layer": int, "name": str, "sparsity": float, "numel": int} per pruned linear
    overall_sparsity: float  # zeros / numel over all pruned linears
    imatrix: dict[str, np.ndarray]  # "<linear>.weight" -> float32 [in_features]: mean of x_j**2 over tokens
    imatrix_tokens: int
    seconds: float


def parse_pattern(text: str) -> tuple[int, int]:
    """ "2:4" -> (2, 4): N of every M consecutive input weights are zeroed."""
    match = _PATTERN.match(text or "")
    if match is None:
        raise SrcrError(f"pattern {text!r} is not N:M; pass two integers such as 2:4")
    n, m = int(match.group(1)), int(match.group(2))
    _check_pattern(n, m)
    return n, m


def _check_pattern(n: int, m: int) -> None:
    if not 0 < n < m:
        raise SrcrError(f"pattern {n}:{m} needs 0 < N < M; pass one such as 2:4 (50%) or 2:8 (25%)")


def validate_spec(spec: PruneSpec) -> None:
    """Refuse a request before any weight is touched."""
    if spec.method not in METHODS:
        raise SrcrError(f"unknown pruning method {spec.method!r}; choose one of {', '.join(METHODS)}")
    if spec.pattern is not None:
        if len(spec.pattern) != 2:
            raise SrcrError(f"pattern {spec.pattern!r} is not (N, M); pass two integers such as (2, 4)")
        _check_pattern(*spec.pattern)
    if not (math.isfinite(spec.sparsity) and 0.0 <= spec.sparsity < 1.0):
        raise SrcrError(f"sparsity {spec.sparsity} is outside [0, 1); pass a fraction such as 0.5")
    if spec.block_size < 1:
        raise SrcrError(f"block_size {spec.block_size} must be positive; the SparseGPT default is 128")
    if spec.method == "sparsegpt" and spec.pattern is not None and spec.block_size % spec.pattern[1]:
        raise SrcrError(
            f"SparseGPT's {spec.block_size}-column blocks cannot hold whole groups of M={spec.pattern[1]}; "
            f"pick an M that divides {spec.block_size}, such as 2:4 or 4:8"
        )
    if not (math.isfinite(spec.percdamp) and spec.percdamp >= 0):
        raise SrcrError(f"percdamp {spec.percdamp} must be a non-negative number; the default is 0.01")
