"""Block quantization grids that a deployment format stores exactly: codes and one fp16 scale per block.

A grid says which values a block of `block` consecutive input weights of a row can take after
quantization: `scale * (code - zero)` with integer codes in [lowest, highest] and the scale as the
format stores it (fp16); or, for the types with a minimum (`_1`), `scale * code + minimum`. srcr's own
quantizer (GPTQ) rounds onto these grids, and the targets write the codes and scales without
quantizing again, so the file dequantizes to exactly the solver's matrix.

The scale rules are ggml's reference quantizers': Q8_0 maps the block's largest magnitude to ±127;
Q4_0 and Q5_0 map the value of largest magnitude, sign included, to the lowest code (−8 and −16 times
the scale), which spends the asymmetric code range on the side where that value lies; Q4_1 and Q5_1
span the block's minimum to its maximum (scale = (max - min) / highest, minimum = min). The symmetric
grids hold 0.0 exactly (the code `zero`), so pruned weights stay zero in the file; on a grid with a
minimum a pruned weight takes the code nearest 0, and the fit widens the range to include 0 when the
block has pruned weights, so that code is within half a step of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlockGrid:
    name: str  # the format's type name, e.g. "Q4_0"
    bits: int
    lowest: int  # smallest stored code
    highest: int  # largest stored code
    zero: int  # the code that stands for 0.0
    signed_extreme: bool  # True: scale = extreme value / (lowest - zero); False: scale = max |x| / highest
    with_minimum: bool = False  # value = scale * code + minimum (Q4_1, Q5_1); `zero` is then unused
    block: int = 32

    def fit(self, values: torch.Tensor, include_zero: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scales, minimums or None) float32 [rows] for blocks `values` [rows, block], rounded through
        fp16 as stored. `include_zero`: the range must reach 0 (the block has pruned weights)."""
        minimum = None
        if self.with_minimum:
            low, high = values.amin(dim=1), values.amax(dim=1)
            if include_zero:
                low, high = low.clamp(max=0), high.clamp(min=0)
            scale = (high - low) / self.highest
            minimum = _as_stored(low, self.name)
        elif self.signed_extreme:
            index = values.abs().argmax(dim=1, keepdim=True)
            scale = values.gather(1, index).squeeze(1) / (self.lowest - self.zero)
        else:
            scale = values.abs().amax(dim=1) / (self.highest - self.zero)
        return _as_stored(scale, self.name), minimum

    def codes(self, values: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest codes (int16) for `values` [rows, ...] on the grid of `scale` [rows] (broadcast)."""
        scale = _broadcast(scale, values)
        offset = values - _broadcast(minimum, values) if self.with_minimum else values
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        steps = torch.round(offset / safe)
        steps = torch.where(scale == 0, torch.zeros_like(steps), steps)
        zero = 0 if self.with_minimum else self.zero
        return (steps + zero).clamp_(self.lowest, self.highest).to(torch.int16)

    def zero_codes(self, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
        """The code of each row's grid nearest 0.0 (exactly 0 on the symmetric grids)."""
        return self.codes(torch.zeros_like(scale), scale, minimum)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> torch.Tensor:
        """float32 values of `codes`, computed as the format does: fp32(scale) * fp32(code - zero), or
        fp32(scale) * fp32(code) + fp32(minimum) rounded after each operation."""
        scale = _broadcast(scale, codes)
        if self.with_minimum:
            product = scale * codes.to(torch.float32)
            return product + _broadcast(minimum, codes)
        return scale * (codes.to(torch.int32) - self.zero).to(torch.float32)


def _broadcast(per_row: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_row.reshape(per_row.shape + (1,) * (like.dim() - per_row.dim()))


def _as_stored(values: torch.Tensor, name: str) -> torch.Tensor:
    stored = values.to(torch.float16)
    if not torch.isfinite(stored).all():
        raise ValueError(f"{name}: a block's scale or minimum does not fit fp16 (weights beyond ±6e4)")
    return stored.to(torch.float32)


GRIDS: dict[str, BlockGrid] = {
    "Q8_0": BlockGrid("Q8_0", 8, lowest=-127, highest=127, zero=0, signed_extreme=False),
    "Q5_0": BlockGrid("Q5_0", 5, lowest=0, highest=31, zero=16, signed_extreme=True),
    "Q4_0": BlockGrid("Q4_0", 4, lowest=0, highest=15, zero=8, signed_extreme=True),
    "Q5_1": BlockGrid("Q5_1", 5, lowest=0, highest=31, zero=0, signed_extreme=False, with_minimum=True),
    "Q4_1": BlockGrid("Q4_1", 4, lowest=0, highest=15, zero=0, signed_extreme=False, with_minimum=True),
}


def grid(name: str) -> BlockGrid:
    if name not in GRIDS:
        raise ValueError(f"no block grid {name!r}; known: {', '.join(GRIDS)}")
    return GRIDS[name]


@dataclass
class BlockCodes:
    """A weight matrix on a grid: codes [rows, columns] (int16), scales and (grids with a minimum)
    minimums [rows, columns / block] (float32)."""

    grid: str
    codes: torch.Tensor
    scales: torch.Tensor
    minimums: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        spec = grid(self.grid)
        rows, columns = self.codes.shape
        blocks = self.codes.reshape(rows, columns // spec.block, spec.block)
        return spec.dequantize(blocks, self.scales, self.minimums).reshape(rows, columns)

    def rows(self, start: int, stop: int) -> BlockCodes:
        return self.map_rows(lambda values: values[start:stop])

    def map_rows(self, reorder: Callable[[torch.Tensor], torch.Tensor]) -> BlockCodes:
        """The same matrix with its rows selected or reordered by `reorder` (codes, scales, minimums alike)."""
        minimums = None if self.minimums is None else reorder(self.minimums)
        return BlockCodes(self.grid, reorder(self.codes), reorder(self.scales), minimums)
