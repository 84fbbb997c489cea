"""Block quantization grids that a deployment format stores exactly: integer codes and per-block scales.

A grid says which values a block of `block` consecutive input weights of a row can take after
quantization, as the format decodes them in fp32:
  symmetric        scale * (code - zero), one constant `zero` (Q8_0, Q4_0, Q5_0, Q6_K, Q3_K,
                   MatMulNBits without zero points);
  with a minimum   scale * code + minimum (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K);
  with a zero point scale * (code - zero_point), an integer zero point per block (MatMulNBits with
                   zero points).
srcr's own quantizer (GPTQ) rounds onto these grids, and the targets write the codes and scales
without quantizing again, so the file decodes to exactly the solver's matrix.

Scales are fitted `span` columns at a time. For the legacy types span == block: each block's scale
(and minimum) is rounded to fp16 as stored. The K-quants fit a super-block of 256 columns at once:
each sub-block's scale (and minimum) is an integer sub-scale times the super-block's fp16 factor
(`d`, and `dmin` for the minimums), which is what `super_scales`/`super_minimums` keep; the
per-block `scales` are always the products the format computes, so codes and dequantization need
not know about the two levels.

The scale rules follow ggml's reference quantizers where they have a simple closed form: Q8_0 maps
the block's largest magnitude to ±127; Q4_0, Q5_0 (and Q6_K's sub-blocks) map the value of largest
magnitude, sign included, to the lowest code, which spends the asymmetric code range on the side
where that value lies; the grids with a minimum span the block's minimum to its maximum. The grids
with a constant zero or a zero point hold 0.0 exactly, so pruned weights stay zero in the file; on a
grid with a minimum a pruned weight takes the code nearest 0, and the fit widens the range to reach 0
when the block has pruned weights, so that code is within half a step of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

SYMMETRIC, MINIMUM, ZERO_POINT = "symmetric", "minimum", "zero-point"


@dataclass(frozen=True)
class BlockFit:
    """The grid of `span` columns of every row: per block [rows, span // block], per span [rows]."""

    scales: torch.Tensor
    offsets: torch.Tensor | None  # minimums (grids with a minimum), zero points (grids with one), or None
    super_scales: torch.Tensor | None = None  # K-quants: the fp16 factor of the integer sub-scales
    super_minimums: torch.Tensor | None = None  # K-quants with a minimum: the factor of the sub-minimums


@dataclass(frozen=True)
class BlockGrid:
    name: str  # the format's type name, e.g. "Q4_0"
    bits: int
    lowest: int  # smallest stored code
    highest: int  # largest stored code
    kind: str = SYMMETRIC  # SYMMETRIC, MINIMUM or ZERO_POINT
    zero: int = 0  # SYMMETRIC: the code that stands for 0.0
    signed_extreme: bool = False  # SYMMETRIC: scale = extreme value / (lowest - zero), else max |x| / (highest - zero)
    block: int = 32  # consecutive weights of a row that share a scale
    span: int = 32  # columns fitted together: a super-block for K-quants, else one block
    sub_scale_range: tuple[int, int] | None = None  # K-quants: the integer sub-scales' range

    @property
    def with_minimum(self) -> bool:
        return self.kind == MINIMUM

    @property
    def holds_zero(self) -> bool:
        """Whether 0.0 is exactly on every block's grid (pruned weights stay exactly zero)."""
        return self.kind != MINIMUM

    def fit(self, values: torch.Tensor, pruned: torch.Tensor | None = None) -> BlockFit:
        """The grid of `values` [rows, span], rounded as stored. `pruned` [rows, span] (or None) marks
        weights that must land on the code nearest 0: a block with any widens its range to reach 0."""
        rows = values.shape[0]
        blocks = values.reshape(-1, self.block)
        reach_zero = (
            torch.zeros(blocks.shape[0], dtype=torch.bool, device=values.device)
            if pruned is None
            else pruned.reshape(-1, self.block).any(dim=1)
        )
        scales, offsets = self._fit_blocks(blocks, reach_zero)
        per_span = self.span // self.block
        if self.sub_scale_range is None:
            scales = _as_stored(scales, self.name)
            if self.kind == ZERO_POINT:
                offsets = self._zero_points(offsets, scales)
            elif offsets is not None:
                offsets = _as_stored(offsets, self.name)
            return BlockFit(
                scales.reshape(rows, per_span), None if offsets is None else offsets.reshape(rows, per_span)
            )
        scales, super_scales = self._two_level(scales.reshape(rows, per_span))
        if offsets is None:
            return BlockFit(scales, None, super_scales)
        negated, super_minimums = self._two_level(-offsets.reshape(rows, per_span))
        return BlockFit(scales, -negated, super_scales, super_minimums)

    def _fit_blocks(self, blocks: torch.Tensor, reach_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unrounded (scales, minimums or None) of each block [n, block]."""
        if self.kind == SYMMETRIC:
            if self.signed_extreme:
                index = blocks.abs().argmax(dim=1, keepdim=True)
                extreme = blocks.gather(1, index).squeeze(1)
                if self.sub_scale_range is not None:
                    lowest, highest = self.lowest - self.zero, self.highest - self.zero
                    return _search_symmetric_scale(blocks, extreme, lowest, highest), None
                return extreme / (self.lowest - self.zero), None
            return blocks.abs().amax(dim=1) / (self.highest - self.zero), None
        low, high = blocks.amin(dim=1), blocks.amax(dim=1)
        # A zero point must be a code, so its range holds 0; K-quants store the minimum as a
        # non-negative multiple of -dmin, so theirs starts at 0 or below.
        reach_zero = reach_zero | (self.kind == ZERO_POINT)
        low = low.clamp(max=0) if self.sub_scale_range is not None else low
        low = torch.where(reach_zero, low.clamp(max=0), low)
        high = torch.where(reach_zero, high.clamp(min=0), high)
        scale = (high - low) / (self.highest - self.lowest)
        if self.sub_scale_range is not None:
            return _search_scale_and_minimum(blocks, scale, low, high, self.highest)
        return scale, low

    def _zero_points(self, low: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """The code of 0 in each block whose range starts at `low` (<= 0) with the stored `scales`."""
        safe = torch.where(scales == 0, torch.ones_like(scales), scales)
        middle = float((self.lowest + self.highest + 1) // 2)
        points = torch.where(scales == 0, torch.full_like(scales, middle), torch.round(-low / safe))
        return points.clamp(self.lowest, self.highest)

    def _two_level(self, sub: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K-quant scales: integer sub-scales in `sub_scale_range` times one fp16 factor per row of
        `sub` [rows, sub-blocks]; returns (the products, the factors)."""
        assert self.sub_scale_range is not None
        low, high = self.sub_scale_range
        factor = _as_stored(sub.abs().amax(dim=1) / high, self.name)
        safe = torch.where(factor == 0, torch.ones_like(factor), factor)
        integers = torch.round(sub / safe.unsqueeze(1)).clamp(low, high)
        return factor.unsqueeze(1) * integers, factor  # exact in fp32: 11-bit x 8-bit mantissas

    def codes(self, values: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest codes (int16) for `values` [n, ...] on the grid of `scale` and `offset` [n] (broadcast)."""
        scale = _broadcast(scale, values)
        shifted = values - _broadcast(offset, values) if self.kind == MINIMUM else values
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        steps = torch.round(shifted / safe)
        steps = torch.where(scale == 0, torch.zeros_like(steps), steps)
        if self.kind == ZERO_POINT:
            steps = steps + _broadcast(offset, values)
        elif self.kind == SYMMETRIC:
            steps = steps + self.zero
        return steps.clamp_(self.lowest, self.highest).to(torch.int16)

    def zero_codes(self, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """The code of each block's grid nearest 0.0 (exactly 0 unless the grid has a minimum)."""
        return self.codes(torch.zeros_like(scale), scale, offset)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
        """float32 values of `codes`, computed as the formats do: fp32(scale) * fp32(code - zero), or
        fp32(scale) * fp32(code) + fp32(minimum) rounded after each operation."""
        scale = _broadcast(scale, codes)
        if self.kind == MINIMUM:
            return scale * codes.to(torch.float32) + _broadcast(offset, codes)
        if self.kind == ZERO_POINT:
            return scale * (codes.to(torch.float32) - _broadcast(offset, codes))
        return scale * (codes.to(torch.int32) - self.zero).to(torch.float32)


def _search_scale_and_minimum(
    blocks: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, high: torch.Tensor, top: int, steps: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's K-quant search (make_qkx2_quants): try grid spacings around (max - min) / top, round,
    refit scale and minimum by least squares weighted by |x| + rms(block), keep the lowest weighted
    error; the minimum stays at or below 0."""
    weight = blocks.abs() + blocks.square().mean(dim=1, keepdim=True).sqrt()
    spread = (high - low).clamp(min=1e-30).unsqueeze(1)

    def error_of(candidate_scale: torch.Tensor, candidate_min: torch.Tensor) -> torch.Tensor:
        safe = torch.where(candidate_scale == 0, torch.ones_like(candidate_scale), candidate_scale)
        levels = torch.round((blocks - candidate_min.unsqueeze(1)) / safe.unsqueeze(1)).clamp(0, top)
        values = candidate_scale.unsqueeze(1) * levels + candidate_min.unsqueeze(1)
        return (weight * (values - blocks).square()).sum(dim=1)

    best_scale, best_min, best_error = scale, low, error_of(scale, low)
    total = weight.sum(dim=1)
    for step in range(steps + 1):
        levels = torch.round((top - 1 + 0.1 * step) / spread * (blocks - low.unsqueeze(1))).clamp(0, top)
        sum_l, sum_ll = (weight * levels).sum(dim=1), (weight * levels.square()).sum(dim=1)
        sum_x, sum_lx = (weight * blocks).sum(dim=1), (weight * levels * blocks).sum(dim=1)
        determinant = total * sum_ll - sum_l.square()
        solvable = determinant > 0
        safe = torch.where(solvable, determinant, torch.ones_like(determinant))
        fitted_scale = (total * sum_lx - sum_x * sum_l) / safe
        fitted_min = (sum_ll * sum_x - sum_l * sum_lx) / safe
        # A minimum above 0 is not storable: pin it to 0 and refit the scale alone.
        positive = fitted_min > 0
        fitted_scale = torch.where(positive, sum_lx / sum_ll.clamp(min=1e-30), fitted_scale)
        fitted_min = torch.where(positive, torch.zeros_like(fitted_min), fitted_min)
        usable = solvable & (fitted_scale > 0)
        error = torch.where(usable, error_of(fitted_scale, fitted_min), torch.full_like(best_error, float("inf")))
        better = error < best_error
        best_scale = torch.where(better, fitted_scale, best_scale)
        best_min = torch.where(better, fitted_min, best_min)
        best_error = torch.where(better, error, best_error)
    return best_scale, best_min


def _search_symmetric_scale(
    blocks: torch.Tensor, extreme: torch.Tensor, lowest: int, highest: int, steps: int = 9
) -> torch.Tensor:
    """ggml's search for symmetric K-quant scales (make_qx_quants): map the extreme value to
    lowest ± 0.1·k, round, refit the scale by least squares weighted by x^2, keep the best fit."""
    weight = blocks.square()
    safe_extreme = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    best_scale = extreme / lowest
    best_score = torch.full_like(extreme, -1.0)
    for step in range(-steps, steps + 1):
        inverse = (lowest + 0.1 * step) / safe_extreme
        levels = torch.round(blocks * inverse.unsqueeze(1)).clamp(lowest, highest)
        sum_lx, sum_ll = (weight * levels * blocks).sum(dim=1), (weight * levels.square()).sum(dim=1)
        usable = sum_ll > 0
        score = torch.where(usable, sum_lx.square() / sum_ll.clamp(min=1e-30), torch.full_like(sum_lx, -1.0))
        better = score > best_score
        best_scale = torch.where(better & usable, sum_lx / sum_ll.clamp(min=1e-30), best_scale)
        best_score = torch.where(better, score, best_score)
    return torch.where(extreme == 0, torch.zeros_like(best_scale), best_scale)


def _broadcast(per_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_row.reshape(per_row.shape + (1,) * (like.dim() - per_row.dim()))


def _as_stored(values: torch.Tensor, name: str) -> torch.Tensor:
    stored = values.to(torch.float16)
    if not torch.isfinite(stored).all():
        raise ValueError(f"{name}: a block's scale or minimum does not fit fp16 (weights beyond ±6e4)")
    return stored.to(torch.float32)


def _legacy(name: str, bits: int, kind: str, signed_extreme: bool = False, zero: int = 0) -> BlockGrid:
    highest = 2**bits - 1 if kind != SYMMETRIC or signed_extreme else 2 ** (bits - 1) - 1
    lowest = -highest if kind == SYMMETRIC and not signed_extreme else 0
    return BlockGrid(name, bits, lowest, highest, kind, zero, signed_extreme)


def _matmul_nbits(bits: int, symmetric: bool) -> BlockGrid:
    # ORT's MatMulNBits decodes (code - zero point) * scale; without zero points the zero point is 2^(bits-1).
    name = f"MatMulNBits-q{bits}" + ("-sym" if symmetric else "")
    middle = 2 ** (bits - 1)
    if symmetric:
        return BlockGrid(name, bits, 0, 2**bits - 1, SYMMETRIC, zero=middle, signed_extreme=True)
    return BlockGrid(name, bits, 0, 2**bits - 1, ZERO_POINT)


GRIDS: dict[str, BlockGrid] = {
    "Q8_0": _legacy("Q8_0", 8, SYMMETRIC),
    "Q5_0": _legacy("Q5_0", 5, SYMMETRIC, signed_extreme=True, zero=16),
    "Q4_0": _legacy("Q4_0", 4, SYMMETRIC, signed_extreme=True, zero=8),
    "Q5_1": _legacy("Q5_1", 5, MINIMUM),
    "Q4_1": _legacy("Q4_1", 4, MINIMUM),
    # K-quants: 256-column super-blocks. Q6_K: 16 blocks of 16 with signed 8-bit sub-scales;
    # Q4_K/Q5_K: 8 blocks of 32 with 6-bit sub-scales and sub-minimums.
    "Q6_K": BlockGrid("Q6_K", 6, 0, 63, SYMMETRIC, 32, True, block=16, span=256, sub_scale_range=(-128, 127)),
    "Q5_K": BlockGrid("Q5_K", 5, 0, 31, MINIMUM, block=32, span=256, sub_scale_range=(0, 63)),
    "Q4_K": BlockGrid("Q4_K", 4, 0, 15, MINIMUM, block=32, span=256, sub_scale_range=(0, 63)),
    # Q3_K: 16 symmetric blocks of 16 (code 4 = 0) with signed 6-bit sub-scales; Q2_K: 16 blocks of 16
    # with 4-bit sub-scales and sub-minimums.
    "Q3_K": BlockGrid("Q3_K", 3, 0, 7, SYMMETRIC, 4, True, block=16, span=256, sub_scale_range=(-32, 31)),
    "Q2_K": BlockGrid("Q2_K", 2, 0, 3, MINIMUM, block=16, span=256, sub_scale_range=(0, 15)),
    **{grid.name: grid for grid in (_matmul_nbits(bits, sym) for bits in (2, 4, 8) for sym in (False, True))},
}


def grid(name: str) -> BlockGrid:
    if name not in GRIDS:
        raise ValueError(f"no block grid {name!r}; known: {', '.join(GRIDS)}")
    return GRIDS[name]


@dataclass
class BlockCodes:
    """A weight matrix on a grid: codes [rows, columns] (int16); scales and offsets (minimums or zero
    points, see BlockFit) [rows, columns / block] (float32); for K-quants the super-blocks' factors
    [rows, columns / span]."""

    grid: str
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None
    super_scales: torch.Tensor | None = None
    super_minimums: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        spec = grid(self.grid)
        rows, columns = self.codes.shape
        blocks = self.codes.reshape(rows, columns // spec.block, spec.block)
        return spec.dequantize(blocks, self.scales, self.offsets).reshape(rows, columns)

    def rows(self, start: int, stop: int) -> BlockCodes:
        return self.map_rows(lambda values: values[start:stop])

    def map_rows(self, reorder: Callable[[torch.Tensor], torch.Tensor]) -> BlockCodes:
        """The same matrix with its rows selected or reordered by `reorder` (every per-row tensor alike)."""

        def apply(values: torch.Tensor | None) -> torch.Tensor | None:
            return None if values is None else reorder(values)

        return BlockCodes(
            self.grid,
            reorder(self.codes),
            reorder(self.scales),
            apply(self.offsets),
            apply(self.super_scales),
            apply(self.super_minimums),
        )
