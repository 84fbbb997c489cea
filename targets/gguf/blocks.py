"""Codes and scales on a block grid (srcr.base.grids) -> the bytes of ggml's legacy block types.

Layouts (ggml-common.h), one block per 32 consecutive weights of a row, little-endian:
- Q8_0: fp16 scale, then 32 int8 codes.
- Q4_0: fp16 scale, then 16 bytes; byte j holds code j in its low nibble and code j + 16 in its high one.
- Q5_0: fp16 scale, a uint32 whose bit j is bit 4 of code j, then the low nibbles as in Q4_0.
- Q4_1, Q5_1: as Q4_0 and Q5_0 with an fp16 minimum after the scale.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from srcr.base.grids import BlockCodes

BLOCK = 32
GGML_TYPES = {
    "Q8_0": gguf.GGMLQuantizationType.Q8_0,
    "Q4_0": gguf.GGMLQuantizationType.Q4_0,
    "Q5_0": gguf.GGMLQuantizationType.Q5_0,
    "Q4_1": gguf.GGMLQuantizationType.Q4_1,
    "Q5_1": gguf.GGMLQuantizationType.Q5_1,
}


def pack(matrix: BlockCodes) -> np.ndarray:
    """uint8 [rows, bytes per row] in the grid's ggml type: what gguf-py's writer takes as raw data."""
    codes = matrix.codes.cpu().numpy().astype(np.int32)
    rows, columns = codes.shape
    blocks = codes.reshape(rows, columns // BLOCK, BLOCK)
    header = [_halves(matrix.scales, rows)]
    if matrix.grid in ("Q4_1", "Q5_1"):
        header.append(_halves(matrix.minimums, rows))
    if matrix.grid == "Q8_0":
        body = blocks.astype(np.int8).view(np.uint8)
    elif matrix.grid in ("Q4_0", "Q4_1"):
        body = _nibbles(blocks)
    elif matrix.grid in ("Q5_0", "Q5_1"):
        high = ((blocks >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
        high_bits = np.bitwise_or.reduce(high, axis=2).astype("<u4").reshape(rows, -1, 1).view(np.uint8)
        body = np.concatenate([high_bits, _nibbles(blocks & 0x0F)], axis=2)
    else:
        raise ValueError(f"no GGUF block layout for grid {matrix.grid!r}")
    return np.ascontiguousarray(np.concatenate([*header, body], axis=2).reshape(rows, -1))


def _halves(values: torch.Tensor | None, rows: int) -> np.ndarray:
    if values is None:
        raise ValueError("this grid stores a minimum per block; the codes came without one")
    return values.cpu().numpy().astype("<f2").reshape(rows, -1, 1).view(np.uint8)


def _nibbles(blocks: np.ndarray) -> np.ndarray:
    low, high = blocks[..., : BLOCK // 2], blocks[..., BLOCK // 2 :]
    return (low | (high << 4)).astype(np.uint8)
