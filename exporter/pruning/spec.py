"""What to prune and what pruning did: the request, its generic validation, and the report."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.grids import GRIDS, BlockCodes

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCK_SIZE = 128


@dataclass(frozen=True)
class PruneSpec:
    method: str  # a key of srcr.exporter.pruning.registry.METHODS
    sparsity: float  # unstructured fraction in [0, 1); ignored when pattern is set
    pattern: tuple[int, int] | None = None  # (n, m): n of every m consecutive input weights zeroed
    block_size: int = DEFAULT_BLOCK_SIZE  # SparseGPT: columns per lazy-update block
    percdamp: float = DEFAULT_PERCDAMP  # SparseGPT: Hessian dampening, a fraction of its mean diagonal
    # srcr's GPTQ: the block grid (srcr.base.grids) to round onto in the same sweep; None leaves the
    # weights in float for the format's own quantizer.
    grid: str | None = None

    @property
    def target_sparsity(self) -> float:
        if self.pattern is not None:
            n, m = self.pattern
            return n / m
        return float(self.sparsity)

    @property
    def solves(self) -> bool:
        """True when the calibration pass changes weights: pruning, GPTQ, or both in one sweep."""
        return self.prunes or self.grid is not None

    @property
    def prunes(self) -> bool:
        """False for the statistics-only pass (sparsity 0, no pattern): the weights stay as they are."""
        return self.target_sparsity > 0


@dataclass(frozen=True)
class LayerSparsity:
    layer: int
    name: str  # the linear's module name, e.g. "model.layers.3.mlp.down_proj"
    sparsity: float  # zeros / numel after pruning
    numel: int


@dataclass
class PruneReport:
    per_layer: list[LayerSparsity]
    overall_sparsity: float  # zeros / numel over all pruned linears
    # "<linear>.weight" -> float32 [in_features]: the mean of x_j**2 over calibration tokens (llama.cpp's imatrix)
    imatrix: dict[str, np.ndarray] = field(repr=False)
    imatrix_tokens: int
    seconds: float
    # "<linear>.weight" -> its codes and scales when GPTQ rounded it onto a format's grid (spec.grid)
    codes: dict[str, BlockCodes] = field(default_factory=dict, repr=False)


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


def check_generic(spec: PruneSpec) -> None:
    """The checks every method shares; a method adds its own (PruningMethod.check)."""
    if spec.pattern is not None:
        if len(spec.pattern) != 2:
            raise SrcrError(f"pattern {spec.pattern!r} is not (N, M); pass two integers such as (2, 4)")
        _check_pattern(*spec.pattern)
    if not (math.isfinite(spec.sparsity) and 0.0 <= spec.sparsity < 1.0):
        raise SrcrError(f"--sparsity {spec.sparsity} is outside [0, 1); pass a fraction such as 0.25")
    if spec.pattern is not None and spec.sparsity:
        raise SrcrError("pass either --sparsity (unstructured) or --pattern N:M, not both")
    if spec.block_size < 1:
        raise SrcrError(f"--prune-block-size {spec.block_size} must be positive; the default is {DEFAULT_BLOCK_SIZE}")
    if spec.grid is not None:
        if spec.grid not in GRIDS:
            raise SrcrError(f"srcr's GPTQ writes {', '.join(GRIDS)}, not {spec.grid}; pick one of them")
        if spec.block_size % GRIDS[spec.grid].block:
            raise SrcrError(
                f"--prune-block-size {spec.block_size} must be a multiple of {GRIDS[spec.grid].block} for "
                f"--quantizer gptq: each {GRIDS[spec.grid].block}-column block gets its scale once"
            )
        if spec.prunes and spec.method != "sparsegpt":
            raise SrcrError(
                "--quantizer gptq prunes and quantizes in one SparseGPT sweep; "
                f"use --method sparsegpt, not {spec.method}"
            )
    if not (math.isfinite(spec.percdamp) and 0 <= spec.percdamp <= 10):
        raise SrcrError(f"--percdamp {spec.percdamp} must be a number in [0, 10]; the default is {DEFAULT_PERCDAMP}")
