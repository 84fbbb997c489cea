"""SparseGPT (Frantar & Alistarh 2023): prune with second-order error compensation.

The Hessian of the layer-wise reconstruction loss, H = 2/N sum x x^T, is accumulated once per
distinct input, so q/k/v (and gate/up) share one Hessian and one inverse, and are solved as one
stack of rows. Each column block (128 columns) chooses its mask from w^2 / [H^-1]_jj^2, then
pruned columns are zeroed one by one and their error is spread onto the columns not yet
visited through the upper Cholesky factor of H^-1, as in GPTQ.

Two solvers compute the same thing:
- `prune_columnwise`: the paper's algorithm as published, one column at a time over the block
  (rank-1 update of the rest of the block per column). The baseline for tests and benchmarks.
- `prune_lazy` (used by prune_model): the same recurrence with the updates inside a block done
  lazily in leaves of a few columns: inside a leaf, two small vector operations per column (or one
  batched triangular solve for the whole leaf), and the rest of the block is corrected by one
  matrix product per leaf; blocks work on a transposed copy so per-column access is contiguous.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from srcr.base.errors import SrcrError
from srcr.base.grids import grid
from srcr.exporter.pruning.gptq import quantize_columnwise
from srcr.exporter.pruning.masks import segment_lowest_k_mask
from srcr.exporter.pruning.method import PruningMethod
from srcr.exporter.pruning.spec import PruneSpec
from srcr.exporter.pruning.stats import InputStatistics

DEFAULT_LEAF = 16


class SparseGPT(PruningMethod):
    summary = "second-order (OBS) pruning with error compensation, as in the paper (default)"

    def __init__(
        self,
        linears: dict[str, torch.nn.Linear],
        spec: PruneSpec,
        statistics: InputStatistics,
        leaf: tuple[int, str] | None = None,
    ) -> None:
        """`leaf`: (width, "columns" | "triangular") for prune_lazy; None picks by device."""
        super().__init__(linears, spec, statistics)
        self.leaf = leaf
        self.tokens = 0
        self.hessian: torch.Tensor | None = torch.zeros(
            (statistics.columns, statistics.columns), dtype=torch.float32, device=statistics.mean_square.device
        )

    @classmethod
    def check(cls, spec: PruneSpec) -> None:
        if spec.pattern is not None and spec.block_size % spec.pattern[1]:
            raise SrcrError(
                f"SparseGPT's {spec.block_size}-column blocks cannot hold whole groups of M={spec.pattern[1]}; "
                f"pick an M that divides {spec.block_size}, such as 2:4 or 4:8, or another --prune-block-size"
            )

    def observe(self, inputs: torch.Tensor) -> None:
        total = self.tokens + inputs.shape[0]
        self.hessian.mul_(self.tokens / total)
        scaled = inputs * math.sqrt(2.0 / total)
        with hessian_matmul_precision(scaled.device):
            self.hessian.addmm_(scaled.T, scaled)
        self.tokens = total

    def prune(self) -> None:
        hinv, dead = inverse_hessian_upper(self.hessian, self.spec.percdamp)
        self.hessian = None
        weight = self.stacked_weight()
        weight[:, dead] = 0
        if self.spec.grid is not None:
            # Joint SparseGPT + GPTQ: one column sweep prunes and rounds onto the format's grid.
            values, codes, pruned = quantize_columnwise(
                weight,
                hinv,
                grid(self.spec.grid),
                self.spec.sparsity,
                self.spec.pattern,
                self.spec.block_size,
                row_splits=self.row_splits(),
            )
            self.write_stacked(values)
            for name, (start, stop) in self.row_ranges().items():
                self.codes[name] = codes.rows(start, stop)
                self.pruned[name] = pruned[start:stop]
            return
        leaf, leaf_solve = self.leaf or leaf_settings(weight.device, self.spec.pattern)
        pruned = prune_lazy(
            weight,
            hinv,
            self.spec.sparsity,
            self.spec.pattern,
            self.spec.block_size,
            row_splits=self.row_splits(),
            leaf=leaf,
            leaf_solve=leaf_solve,
        )
        self.write_stacked(pruned)


def leaf_settings(device: torch.device, pattern: tuple[int, int] | None) -> tuple[int, str]:
    """(leaf width, in-leaf solver) for `prune_lazy`.

    On CPU the column loop over 16-column leaves is the fastest (bench/bench_solver.py): LAPACK's
    batched triangular solve loops over the rows there. On CUDA one batched solve per leaf costs a
    few kernel launches instead of two per column (docs/pruning.md: not yet timed on a GPU).
    """
    if device.type == "cuda" and pattern is None:
        return 32, "triangular"
    return DEFAULT_LEAF, "columns"


@contextmanager
def hessian_matmul_precision(device: torch.device) -> Iterator[None]:
    """TF32 inputs with float32 accumulation for x x^T on CUDA (docs/pruning.md has the measured effect)."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        previous = matmul.fp32_precision
        matmul.fp32_precision = "tf32"
        try:
            yield
        finally:
            matmul.fp32_precision = previous
    else:
        previous = matmul.allow_tf32
        matmul.allow_tf32 = True
        try:
            yield
        finally:
            matmul.allow_tf32 = previous


def inverse_hessian_upper(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = H^-1), and the dead-input mask.

    Overwrites `hessian`. A dead input (never nonzero in calibration, H_jj = 0) gets H_jj = 1 so H
    stays invertible; the caller zeroes its weights, which carry no calibrated signal.
    """
    diagonal = hessian.diagonal()
    dead = diagonal == 0
    diagonal[dead] = 1
    diagonal.add_(percdamp * diagonal.mean())
    lower, info = torch.linalg.cholesky_ex(hessian)
    if info.item() != 0:
        raise _not_positive_definite(percdamp)
    inverse = torch.cholesky_inverse(lower)
    del lower
    # H^-1 of a barely positive definite H can lose definiteness to rounding: guard the second factorization too.
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if info.item() != 0:
        raise _not_positive_definite(percdamp)
    return upper, dead


def _not_positive_definite(percdamp: float) -> SrcrError:
    return SrcrError(
        f"the calibration Hessian is not positive definite at --percdamp {percdamp}; "
        f"raise it (e.g. --percdamp {max(0.1, percdamp * 10):g}) or calibrate on more samples"
    )


def _check_shapes(weight: torch.Tensor, pattern: tuple[int, int] | None, block_size: int) -> None:
    if pattern is not None:
        if weight.shape[1] % pattern[1]:
            raise SrcrError(f"{weight.shape[1]} input columns are not divisible by M={pattern[1]}")
        if block_size % pattern[1]:
            raise SrcrError(f"block_size {block_size} is not a multiple of M={pattern[1]}")


def prune_columnwise(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    block_size: int = 128,
    row_splits: list[int] | None = None,
) -> torch.Tensor:
    """The published algorithm, column by column; returns the pruned copy of `weight` [rows, cols].

    Masks use exact counts (masks.py) where the reference thresholds with `<=`, which can prune
    one weight more per block; everything else follows the reference line by line.
    """
    _check_shapes(weight, pattern, block_size)
    weight = weight.clone()
    rows, columns = weight.shape
    row_splits = row_splits or [rows]
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = weight[:, i1:i2].clone()
        hinv_block = hinv[i1:i2, i1:i2]
        pruned_block = torch.zeros_like(block)
        errors = torch.zeros_like(block)
        if pattern is None:
            scores = block.square() / hinv_block.diagonal().square()
            mask = segment_lowest_k_mask(scores, sparsity, row_splits)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                scores = block[:, i : i + m].square() / hinv_block.diagonal()[i : i + m].square()
                mask.scatter_(1, i + torch.topk(scores, n, dim=1, largest=False).indices, True)
            column = block[:, i]
            kept = column.clone()
            kept[mask[:, i]] = 0
            pruned_block[:, i] = kept
            error = (column - kept) / hinv_block[i, i]
            block[:, i:] -= error.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)
            errors[:, i] = error
        weight[:, i1:i2] = pruned_block
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return weight


def prune_lazy(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    sparsity: float,
    pattern: tuple[int, int] | None,
    block_size: int = 128,
    row_splits: list[int] | None = None,
    leaf: int = DEFAULT_LEAF,
    leaf_solve: str = "columns",
) -> torch.Tensor:
    """Same result as `prune_columnwise`, with in-block updates deferred to `leaf`-column products.

    Inside a leaf the recurrence is solved either column by column ("columns": two vector
    operations per column) or, all weight rows at once, as one batched unit-triangular system per
    leaf ("triangular"). N:M leaves are one group wide: a group's mask is chosen from its weights
    after every earlier column's error has reached them, as in the reference.
    """
    _check_shapes(weight, pattern, block_size)
    solve_leaf = LEAF_SOLVERS[leaf_solve]
    rows, columns = weight.shape
    row_splits = row_splits or [rows]
    if pattern is not None:
        leaf = pattern[1]
    # Transposed: column j of W is the contiguous row j, for every per-column operation.
    transposed = weight.T.contiguous()
    hinv_diagonal = hinv.diagonal()
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = transposed[i1:i2]
        hinv_block = hinv[i1:i2, i1:i2]
        diagonal = hinv_diagonal[i1:i2].unsqueeze(1)
        if pattern is None:
            mask = segment_lowest_k_mask((block.square() / diagonal.square()).T, sparsity, row_splits).T
            error_scale = mask / diagonal  # 1/[H^-1]_jj where pruned, 0 where kept
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
            error_scale = torch.zeros_like(block)
        errors = torch.empty_like(block)
        width = i2 - i1
        for j1 in range(0, width, leaf):
            j2 = min(j1 + leaf, width)
            if pattern is not None:
                _choose_n_m(block, diagonal, mask, error_scale, j1, *pattern)
            solve_leaf(block[j1:j2], hinv_block[j1:j2, j1:j2], error_scale[j1:j2], errors[j1:j2])
            if j2 < width:
                block[j2:].addmm_(hinv_block[j1:j2, j2:].T, errors[j1:j2], alpha=-1)
        # Each kept column now holds its value at its turn, which is the reference's result.
        block.masked_fill_(mask, 0)
        if i2 < columns:
            transposed[i2:].addmm_(hinv[i1:i2, i2:].T, errors, alpha=-1)
    return transposed.T


def solve_leaf_by_columns(
    values: torch.Tensor, hinv_leaf: torch.Tensor, error_scale: torch.Tensor, errors: torch.Tensor
) -> None:
    """values [b, rows] (column j of W is row j), updated in place to each column's value at its turn;
    errors[j] = error_scale[j] * that value."""
    width = values.shape[0]
    for j in range(width):
        torch.mul(values[j], error_scale[j], out=errors[j])
        if j + 1 < width:
            values[j + 1 :].addr_(hinv_leaf[j, j + 1 :], errors[j], alpha=-1)


def solve_leaf_triangular(
    values: torch.Tensor,
    hinv_leaf: torch.Tensor,
    error_scale: torch.Tensor,
    errors: torch.Tensor,
    max_system_bytes: int = 1 << 28,
) -> None:
    """The same as `solve_leaf_by_columns` in a few batched operations.

    Per weight row r the errors satisfy e_j = s_rj (w_rj - sum_{k<j} U_kj e_k): the unit lower
    triangular system (I + diag(s_r) L) e = s_r * w_r with L = strictly lower part of U^T.
    """
    width, rows = values.shape
    lower = hinv_leaf.T.tril(-1)
    chunk = max(1, max_system_bytes // (width * width * values.element_size()))
    for r1 in range(0, rows, chunk):
        scale = error_scale[:, r1 : r1 + chunk].T
        system = scale.unsqueeze(2) * lower
        right = (scale * values[:, r1 : r1 + chunk].T).unsqueeze(2)
        solution = torch.linalg.solve_triangular(system, right, upper=False, unitriangular=True)
        errors[:, r1 : r1 + chunk] = solution.squeeze(2).T
    values.addmm_(lower, errors, alpha=-1)


LEAF_SOLVERS = {"columns": solve_leaf_by_columns, "triangular": solve_leaf_triangular}


def _choose_n_m(
    block: torch.Tensor,
    diagonal: torch.Tensor,
    mask: torch.Tensor,
    error_scale: torch.Tensor,
    j: int,
    n: int,
    m: int,
) -> None:
    """Mask the n lowest w^2/[H^-1]_jj^2 of group rows j..j+m of the transposed block, all weight rows at once."""
    scores = block[j : j + m].square() / diagonal[j : j + m].square()
    mask[j : j + m].scatter_(0, torch.topk(scores, n, dim=0, largest=False).indices, True)
    torch.div(mask[j : j + m], diagonal[j : j + m], out=error_scale[j : j + m])
