"""GPTQ (Frantar et al. 2023) on a format's own block grid, alone or joint with SparseGPT's mask.

One sweep over the columns, as the IST-DASLab SparseGPT reference does when given a quantizer: in each
column block (`block_size` columns) the mask is chosen first (w^2 / [H^-1]_jj^2, as SparseGPT), then
column by column every weight is either pruned (set to the grid's zero: exact on the symmetric types, the code nearest
0 on those with a minimum) or rounded onto the grid,
and the error of both is spread onto the columns not yet visited through the upper Cholesky factor of
H^-1. The grid's scale for each block of `grid.block` consecutive columns is fitted when the sweep
reaches the block's first column, from the row's current (already compensated) kept weights, and
rounded to fp16 as the format stores it, so the columns that follow are compensated onto the grid
that will really be written. Columns are visited in their natural order: the formats need contiguous
blocks, so there is no activation reordering.
"""

from __future__ import annotations

import torch

from srcr.base.errors import SrcrError
from srcr.base.grids import BlockCodes, BlockGrid
from srcr.exporter.pruning.masks import segment_lowest_k_mask


def check_grid_shapes(columns: int, grid: BlockGrid, block_size: int) -> None:
    if columns % grid.block:
        raise SrcrError(
            f"{grid.name} stores rows in blocks of {grid.block}; a matrix with {columns} input columns cannot be "
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
    codes = torch.empty((rows, columns), dtype=torch.int16, device=weight.device)
    scales = torch.empty((rows, columns // grid.block), dtype=torch.float32, device=weight.device)
    minimums = torch.empty_like(scales) if grid.with_minimum else None
    pruned = torch.zeros((rows, columns), dtype=torch.bool, device=weight.device)
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        block = weight[:, i1:i2].clone()
        hinv_block = hinv[i1:i2, i1:i2]
        diagonal = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        if pattern is None and sparsity > 0:
            mask = segment_lowest_k_mask(block.square() / diagonal.square(), sparsity, row_splits)
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                scores = block[:, i : i + m].square() / diagonal[i : i + m].square()
                mask.scatter_(1, i + torch.topk(scores, n, dim=1, largest=False).indices, True)
            column_index = i1 + i
            group = column_index // grid.block
            if column_index % grid.block == 0:
                block_mask = mask[:, i : i + grid.block]
                kept = block[:, i : i + grid.block].masked_fill(block_mask, 0)
                scales[:, group], minimum = grid.fit(kept, include_zero=bool(block_mask.any()))
                if minimums is not None:
                    minimums[:, group] = minimum
            scale = scales[:, group]
            minimum = None if minimums is None else minimums[:, group]
            column = block[:, i]
            code = torch.where(mask[:, i], grid.zero_codes(scale, minimum), grid.codes(column, scale, minimum))
            value = grid.dequantize(code, scale, minimum)
            codes[:, column_index] = code
            error = (column - value) / hinv_block[i, i]
            block[:, i:] -= error.unsqueeze(1) @ hinv_block[i, i:].unsqueeze(0)
            block[:, i] = value
            errors[:, i] = error
        weight[:, i1:i2] = block
        pruned[:, i1:i2] = mask
        weight[:, i2:] -= errors @ hinv[i1:i2, i2:]
    return weight, BlockCodes(grid.name, codes, scales, minimums), pruned


def round_to_nearest(weight: torch.Tensor, grid: BlockGrid) -> BlockCodes:
    """The same grid without error compensation: each block's scale from its own weights, nearest codes."""
    rows, columns = weight.shape
    blocks = weight.reshape(rows, columns // grid.block, grid.block)
    scales, minimums = grid.fit(blocks.reshape(-1, grid.block))
    scales = scales.reshape(rows, -1)
    minimums = None if minimums is None else minimums.reshape(rows, -1)
    return BlockCodes(grid.name, grid.codes(blocks, scales, minimums).reshape(rows, columns), scales, minimums)
