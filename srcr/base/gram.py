"""A rounded weight matrix's error as its layer's output sees it, input correlations included.

The importance matrix weighs each input column by its mean square and ignores how columns move
together (srcr.base.allocation.relative_error). GPTQ's whole gain lies in those correlations: it
moves each column's rounding error onto the columns not yet rounded, along the calibration inputs'
Gram matrix H = E[x xᵀ], so an error measure blind to them cannot tell GPTQ from plain rounding.
With H the relative error is tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), the mean squared change of the layer's
outputs over the calibration inputs relative to their mean square; with a diagonal H it is
relative_error itself.

srcr's GPTQ lives above this layer (exporter/), so a target sees it as a `GptqSolver`: the Gram
matrix of a weight matrix's inputs and the codes GPTQ writes for it on a format's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from srcr.base.allocation import relative_error
from srcr.base.grids import BlockCodes


def gram_error(weight: np.ndarray, approximation: np.ndarray, gram: np.ndarray) -> float:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) for [out, in] matrices and the [in, in] Gram matrix H of their inputs."""
    gram = np.asarray(gram, dtype=np.float64)
    weight = np.asarray(weight, dtype=np.float64)
    difference = weight - approximation
    total = float(np.einsum("ij,jk,ik->", weight, gram, weight, optimize=True))
    error = float(np.einsum("ij,jk,ik->", difference, gram, difference, optimize=True))
    return error / total if total > 0 else 0.0


def output_error(
    weight: np.ndarray, approximation: np.ndarray, importance: np.ndarray | None, gram: np.ndarray | None
) -> float:
    """A matrix's relative error in the one metric its KL curve and its candidates share: the Gram
    metric where the Gram matrix is known, else the importance-weighted one."""
    if gram is not None:
        return gram_error(weight, approximation, gram)
    return relative_error(weight, approximation, importance)


@dataclass(frozen=True)
class GptqSolver:
    """srcr's GPTQ, one weight matrix at a time (Hugging Face weight names, [out, in] in their row order).

    `gram(name)`: the Gram matrix of the matrix's calibration inputs, None for a matrix with none (the
    embedding, the head); `solve(name, grid)`: the codes GPTQ writes for it on that grid."""

    gram: Callable[[str], np.ndarray | None]
    solve: Callable[[str, str], BlockCodes]
