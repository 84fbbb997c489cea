"""GPTQ (Frantar et al. 2023) on a format's own block grid, alone or joint with SparseGPT's mask.

One sweep over the columns, as the IST-DASLab SparseGPT reference does when given a quantizer: in each
column block (`block_size` columns) the mask is chosen first (w^2 / [H^-1]_jj^2, as SparseGPT), then
column by column every weight is either pruned (set to the grid's zero: exact on the symmetric types, the code nearest
0 on those with a minimum) or rounded onto the grid,
and the error of both is spread onto the columns not yet visited through the upper Cholesky factor of
H^-1. The grid's scales for each `grid.span` consecutive columns (one block of 32 for the legacy types
and MatMulNBits, a 256-column super-block for the K-quants) are fitted when the sweep reaches the
span's first column, from the rows' current (already compensated) weights, and rounded as the format
stores them, so the columns that follow are compensated onto the grid that will really be written.
Columns are visited in their natural order: the formats need contiguous blocks, so there is no
activation reordering. Inside a batch the updates are applied leaf by leaf (32 columns), as srcr's
SparseGPT solver does, which gives the same result with far less memory traffic. A span must lie
inside one lazy batch of columns, so for the K-quants the
sweep takes 256 columns at a time; SparseGPT's adaptive mask is still chosen per `block_size` columns,
so a super-block's scales are fitted before the mask of its second half is known (the K-quants'
ranges reach 0 anyway, and Q6_K holds 0 exactly).
"""

from __future__ import annotations

import math

import torch

from srcr.base.errors import SrcrError
from srcr.base.grids import SYMMETRIC, BlockCodes, BlockFit, BlockGrid
from srcr.exporter.pruning.masks import segment_lowest_k_mask


def check_grid_shapes(columns: int, grid: BlockGrid, block_size: int) -> None:
    if columns % grid.span:
        raise SrcrError(
            f"{grid.name} stores rows in blocks of {grid.span}; a matrix with {columns} input columns cannot be "
            f"written exactly; use llama.cpp's quantizer (--quantizer llama.cpp)"
        )
    if block_size % grid.block:
        raise SrcrError(
            f"--prune-block-size {block_size} must be a multiple of {grid.block} for --quantizer gptq "
            f"(a scale is fitted once per {grid.block} columns)"
        )


def quantize_columnwise(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    grid: BlockGrid,
    sparsity: float = 0.0,
    pattern: tuple[int, int] | None = None,
    block_size: int = 128,
    row_splits: list[int] | None = None,
) -> tuple[torch.Tensor, BlockCodes, torch.Tensor]:
    """Quantize (and prune) `weight` [rows, columns] with `hinv` (upper Cholesky factor of H^-1).

    Returns the dequantized result (exactly what the format will decode), its codes and scales, and
    the pruning mask (True where a weight was pruned, as opposed to rounded to zero).
    """
    check_grid_shapes(weight.shape[1], grid, block_size)
    if pattern is not None and block_size % pattern[1]:
        raise SrcrError(f"block_size {block_size} is not a multiple of M={pattern[1]}")
    weight = weight.clone()
    rows, columns = weight.shape
    row_splits = row_splits or [rows]
    mask_block, block_size = block_size, math.lcm(block_size, grid.span)
    # Updates inside a batch are deferred leaf by leaf (32 columns: a legacy block); every mask choice
    # and grid fit happens at a leaf boundary, where all of the batch is up to date.
    leaf = math.gcd(32, mask_block)
    if pattern is not None and leaf % pattern[1]:
        leaf = block_size
    codes = torch.empty((rows, columns), dtype=torch.int16, device=weight.device)
    fits = Fits(rows, columns, grid, weight.device)
    pruned = torch.zeros((rows, columns), dtype=torch.bool, device=weight.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = weight[:, i1:i2].clone()
        hinv_block = hinv[i1:i2, i1:i2]
        diagonal = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is None and sparsity > 0 and i % mask_block == 0:
                # SparseGPT's adaptive mask: chosen per `mask_block` columns from the compensated weights.
                chosen = slice(i, i + mask_block)
                scores = block[:, chosen].square() / diagonal[chosen].square()
                mask[:, chosen] = segment_lowest_k_mask(scores, sparsity, row_splits)
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                scores = block[:, i : i + m].square() / diagonal[i : i + m].square()
                mask.scatter_(1, i + torch.topk(scores, n, dim=1, largest=False).indices, True)
            column_index = i1 + i
            if column_index % grid.span == 0:
                span_mask = mask[:, i : i + grid.span]
                fits.put(column_index, grid.fit(block[:, i : i + grid.span].masked_fill(span_mask, 0), span_mask))
            scale, offset = fits.at(column_index)
            column = block[:, i]
            code = torch.where(mask[:, i], grid.zero_codes(scale, offset), grid.codes(column, scale, offset))
            value = grid.dequantize(code, scale, offset)
            codes[:, column_index] = code
            error = (column - value) / hinv_block[i, i]
            leaf_end = min((i // leaf + 1) * leaf, i2 - i1)
            block[:, i:leaf_end] -= error.unsqueeze(1) @ hinv_block[i, i:leaf_end].unsqueeze(0)
            block[:, i] = value
            errors[:, i] = error
            if i + 1 == leaf_end:  # a leaf is done: its errors reach the rest of the batch at once
                leaf_start = leaf_end - leaf
                block[:, leaf_end:] -= errors[:, leaf_start:leaf_end] @ hinv_block[leaf_start:leaf_end, leaf_end:]
        weight[:, i1:i2] = block
        pruned[:, i1:i2] = mask
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return weight, fits.codes(codes), pruned


class Fits:
    """The grid fitted so far: per-block scales and offsets, per-span factors (K-quants)."""

    def __init__(self, rows: int, columns: int, grid: BlockGrid, device: torch.device) -> None:
        self.grid = grid
        self.scales = torch.empty((rows, columns // grid.block), dtype=torch.float32, device=device)
        self.offsets = torch.empty_like(self.scales) if grid.kind != SYMMETRIC else None
        supers = torch.empty((rows, columns // grid.span), dtype=torch.float32, device=device)
        self.super_scales = supers if grid.sub_scale_range is not None else None
        self.super_minimums = supers.clone() if grid.sub_scale_range is not None and grid.with_minimum else None

    def put(self, column: int, fit: BlockFit) -> None:
        first, count = column // self.grid.block, self.grid.span // self.grid.block
        self.scales[:, first : first + count] = fit.scales
        if self.offsets is not None:
            self.offsets[:, first : first + count] = fit.offsets
        for mine, fitted in ((self.super_scales, fit.super_scales), (self.super_minimums, fit.super_minimums)):
            if mine is not None:
                mine[:, column // self.grid.span] = fitted

    def at(self, column: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The scale and offset [rows] of the block holding `column`."""
        block = column // self.grid.block
        return self.scales[:, block], None if self.offsets is None else self.offsets[:, block]

    def codes(self, codes: torch.Tensor) -> BlockCodes:
        return BlockCodes(self.grid.name, codes, self.scales, self.offsets, self.super_scales, self.super_minimums)


def round_to_nearest(weight: torch.Tensor, grid: BlockGrid) -> BlockCodes:
    """The same grid without error compensation: each span's scales from its own weights, nearest codes."""
    rows, columns = weight.shape
    fits = Fits(rows, columns, grid, weight.device)
    for start in range(0, columns, grid.span):
        fits.put(start, grid.fit(weight[:, start : start + grid.span]))
    blocks = weight.reshape(rows, columns // grid.block, grid.block)
    return fits.codes(grid.codes(blocks, fits.scales, fits.offsets).reshape(rows, columns))
