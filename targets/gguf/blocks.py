"""Codes and scales on a block grid (srcr.base.grids) -> the bytes of ggml's block types.

Layouts (ggml-common.h), little-endian, one block per 32 (legacy) or 256 (K-quants) consecutive
weights of a row:
- Q8_0: fp16 scale, then 32 int8 codes.
- Q4_0: fp16 scale, then 16 bytes; byte j holds code j in its low nibble and code j + 16 in its high one.
- Q5_0: fp16 scale, a uint32 whose bit j is bit 4 of code j, then the low nibbles as in Q4_0.
- Q4_1, Q5_1: as Q4_0 and Q5_0 with an fp16 minimum after the scale.
- Q4_K: fp16 d, fp16 dmin, 12 bytes of eight 6-bit sub-scales and sub-minimums, then 4 runs of 32
  bytes; run j holds sub-block 2j in its low nibbles and sub-block 2j + 1 in its high ones.
- Q5_K: as Q4_K with 32 bytes of fifth bits (bit j of byte l: sub-block j, weight l) before the nibbles.
- Q2_K: 16 bytes of 4-bit sub-scales (low nibble) and sub-minimums (high), 64 bytes of 2-bit codes
  (weight 128h + 32s + l at bits 2s of byte 32h + l), fp16 d, fp16 dmin.
- Q3_K: 32 bytes of third bits (weight 32j + l: bit j of byte l), the low 2 bits as in Q2_K, 12 bytes
  of sixteen 6-bit sub-scales stored + 32, fp16 d.
- Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, 16 int8 sub-scales, fp16 d; each
  half of 128 weights takes 64 low-nibble bytes (weights 0-63 low, 64-127 high) and 32 pair bytes
  (pair t of byte l: weight 32t + l).
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from srcr.base.grids import BlockCodes

BLOCK = 32
SUPER_BLOCK = 256
GGML_TYPES = {
    name: getattr(gguf.GGMLQuantizationType, name)
    for name in ("Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
}


def pack(matrix: BlockCodes) -> np.ndarray:
    """uint8 [rows, bytes per row] in the grid's ggml type: what gguf-py's writer takes as raw data."""
    codes = matrix.codes.cpu().numpy().astype(np.int32)
    rows, columns = codes.shape
    if matrix.grid in _K_PACKERS:
        supers = codes.reshape(rows, columns // SUPER_BLOCK, SUPER_BLOCK)
        return np.ascontiguousarray(_K_PACKERS[matrix.grid](matrix, supers).reshape(rows, -1))
    blocks = codes.reshape(rows, columns // BLOCK, BLOCK)
    header = [_halves(matrix.scales, rows)]
    if matrix.grid in ("Q4_1", "Q5_1"):
        header.append(_halves(matrix.offsets, rows))
    if matrix.grid == "Q8_0":
        body = blocks.astype(np.int8).view(np.uint8)
    elif matrix.grid in ("Q4_0", "Q4_1"):
        body = _nibbles(blocks)
    elif matrix.grid in ("Q5_0", "Q5_1"):
        body = np.concatenate([_bit_planes(blocks, 4, BLOCK).reshape(rows, -1, 4), _nibbles(blocks & 0x0F)], axis=2)
    else:
        raise ValueError(f"no GGUF block layout for grid {matrix.grid!r}")
    return np.ascontiguousarray(np.concatenate([*header, body], axis=2).reshape(rows, -1))


def _pack_q45_k(matrix: BlockCodes, supers: np.ndarray) -> np.ndarray:
    rows, count = supers.shape[:2]
    d, dmin = _halves(matrix.super_scales, rows), _halves(matrix.super_minimums, rows)
    sub_scales = _sub_integers(matrix.scales, matrix.super_scales, rows, count)
    sub_minimums = _sub_integers(-matrix.offsets, matrix.super_minimums, rows, count)
    packed_scales = _six_bit_pairs(sub_scales, sub_minimums)
    runs = supers.reshape(rows, count, 4, 2, BLOCK)
    nibbles = ((runs[..., 0, :] & 0x0F) | ((runs[..., 1, :] & 0x0F) << 4)).astype(np.uint8).reshape(rows, count, -1)
    parts = [d, dmin, packed_scales]
    if matrix.grid == "Q5_K":
        parts.append(_bit_of_runs(supers, 4))
    return np.concatenate([*parts, nibbles], axis=2)


def _pack_q6_k(matrix: BlockCodes, supers: np.ndarray) -> np.ndarray:
    rows, count = supers.shape[:2]
    sub_scales = _sub_integers(matrix.scales, matrix.super_scales, rows, count).astype(np.int8).view(np.uint8)
    halves = supers.reshape(rows, count, 2, 4, BLOCK)  # [half, run t of 32 weights, weight l]
    low, high = halves & 0x0F, (halves >> 4) & 0x03
    # Low nibbles: byte k*32 + l of a half holds run k (low) and run k + 2 (high), k = 0, 1.
    ql = (low[..., :2, :] | (low[..., 2:, :] << 4)).astype(np.uint8).reshape(rows, count, 2 * 64)
    qh = np.zeros((rows, count, 2, BLOCK), dtype=np.uint8)
    for t in range(4):
        qh |= (high[..., t, :] << (2 * t)).astype(np.uint8)
    d = _halves(matrix.super_scales, rows)
    return np.concatenate([ql, qh.reshape(rows, count, 64), sub_scales, d], axis=2)


def _bit_of_runs(supers: np.ndarray, bit: int) -> np.ndarray:
    """32 bytes per super-block holding bit `bit` of every code: weight 32j + l at bit j of byte l
    (Q5_K's fifth bits, Q3_K's third)."""
    rows, count = supers.shape[:2]
    runs = supers.reshape(rows, count, 8, BLOCK)
    packed = np.zeros((rows, count, BLOCK), dtype=np.uint8)
    for run in range(8):
        packed |= (((runs[:, :, run] >> bit) & 1) << run).astype(np.uint8)
    return packed


def _crumbs(supers: np.ndarray) -> np.ndarray:
    """The low 2 bits of a super-block's codes, Q2_K/Q3_K style: weight 128h + 32s + l at bits 2s of
    byte 32h + l."""
    rows, count = supers.shape[:2]
    parts = (supers & 0x03).reshape(rows, count, 2, 4, BLOCK)
    packed = np.zeros((rows, count, 2, BLOCK), dtype=np.uint8)
    for shift in range(4):
        packed |= (parts[..., shift, :] << (2 * shift)).astype(np.uint8)
    return packed.reshape(rows, count, 64)


def _pack_q2_k(matrix: BlockCodes, supers: np.ndarray) -> np.ndarray:
    rows, count = supers.shape[:2]
    sub_scales = _sub_integers(matrix.scales, matrix.super_scales, rows, count)
    sub_minimums = _sub_integers(-matrix.offsets, matrix.super_minimums, rows, count)
    scales = (sub_scales | (sub_minimums << 4)).astype(np.uint8)
    d, dmin = _halves(matrix.super_scales, rows), _halves(matrix.super_minimums, rows)
    return np.concatenate([scales, _crumbs(supers), d, dmin], axis=2)


def _pack_q3_k(matrix: BlockCodes, supers: np.ndarray) -> np.ndarray:
    rows, count = supers.shape[:2]
    stored = _sub_integers(matrix.scales, matrix.super_scales, rows, count) + 32  # 6 bits, offset by 32
    low = (stored[..., :8] & 0x0F) | ((stored[..., 8:] & 0x0F) << 4)
    high = np.zeros((rows, count, 4), dtype=np.int32)
    for group in range(4):  # byte 8 + i, bits 2k: the high bits of sub-scale 4k + i
        high |= ((stored[..., 4 * group : 4 * group + 4] >> 4) & 0x03) << (2 * group)
    scales = np.concatenate([low, high], axis=2).astype(np.uint8)
    d = _halves(matrix.super_scales, rows)
    return np.concatenate([_bit_of_runs(supers, 2), _crumbs(supers), scales, d], axis=2)


def _sub_integers(products: torch.Tensor, factors: torch.Tensor | None, rows: int, count: int) -> np.ndarray:
    """The integer sub-scales behind `products` [rows, sub-blocks] = factor of their super-block x integer."""
    if factors is None:
        raise ValueError("a K-quant matrix came without its super-blocks' factors")
    values = products.cpu().numpy().reshape(rows, count, -1)
    per_super = factors.cpu().numpy().reshape(rows, count, 1)
    safe = np.where(per_super == 0, 1.0, per_super)
    integers = np.where(per_super == 0, 0.0, np.round(values / safe)).astype(np.int32)
    if not np.array_equal(per_super * integers.astype(np.float32), values):
        raise ValueError("K-quant sub-scales are not integer multiples of their super-block's factor")
    return integers


def _six_bit_pairs(scales: np.ndarray, minimums: np.ndarray) -> np.ndarray:
    """ggml's 12-byte packing of eight 6-bit sub-scales and eight 6-bit sub-minimums."""
    low_scales, high_scales = scales[..., :4], scales[..., 4:]
    low_minimums, high_minimums = minimums[..., :4], minimums[..., 4:]
    first = low_scales | ((high_scales >> 4) << 6)
    second = low_minimums | ((high_minimums >> 4) << 6)
    third = (high_scales & 0x0F) | ((high_minimums & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=2).astype(np.uint8)


_K_PACKERS = {"Q2_K": _pack_q2_k, "Q3_K": _pack_q3_k, "Q4_K": _pack_q45_k, "Q5_K": _pack_q45_k, "Q6_K": _pack_q6_k}


def _bit_planes(blocks: np.ndarray, bit: int, width: int) -> np.ndarray:
    """uint8 [..., width / 8]: bit `bit` of each code, code j at bit j of a little-endian word."""
    plane = ((blocks >> bit) & 1).astype(np.uint64) << np.arange(width, dtype=np.uint64)
    words = np.bitwise_or.reduce(plane, axis=-1).astype(f"<u{width // 8}")
    return words.reshape(*blocks.shape[:-1], 1).view(np.uint8)


def _halves(values: torch.Tensor | None, rows: int) -> np.ndarray:
    if values is None:
        raise ValueError("this grid stores a second fp16 value per block; the codes came without one")
    return values.cpu().numpy().astype("<f2").reshape(rows, -1, 1).view(np.uint8)


def _nibbles(blocks: np.ndarray) -> np.ndarray:
    low, high = blocks[..., : BLOCK // 2], blocks[..., BLOCK // 2 :]
    return (low | (high << 4)).astype(np.uint8)
