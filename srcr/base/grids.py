"""Block quantization grids that a deployment format stores exactly: codes and one fp16 scale per block.

A grid says which values a block of `block` consecutive input weights of a row can take after
quantization: `scale * (code - zero)` with integer codes in [lowest, highest] and the scale as the
format stores it (fp16). srcr's own quantizer (GPTQ) rounds onto these grids, and the targets write the
codes and scales without quantizing again, so the file dequantizes to exactly the solver's matrix.

The scale rules are ggml's reference quantizers': Q8_0 maps the block's largest magnitude to ±127;
Q4_0 and Q5_0 map the value of largest magnitude, sign included, to the lowest code (−8 and −16 times
the scale), which spends the asymmetric code range on the side where that value lies. Every grid here
holds 0.0 exactly (the code `zero`), so pruned weights stay zero in the file.
"""

from __future__ import annotations

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
    block: int = 32

    def fit(self, values: torch.Tensor) -> torch.Tensor:
        """Scales float32 [rows] for blocks `values` [rows, block], rounded through fp16 as stored."""
        if self.signed_extreme:
            index = values.abs().argmax(dim=1, keepdim=True)
            scale = values.gather(1, index).squeeze(1) / (self.lowest - self.zero)
        else:
            scale = values.abs().amax(dim=1) / (self.highest - self.zero)
        stored = scale.to(torch.float16)
        if not torch.isfinite(stored).all():
            raise ValueError(f"{self.name}: a block's scale does not fit fp16 (weights beyond ±6e4)")
        return stored.to(torch.float32)

    def codes(self, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Nearest codes (int16) for `values` [rows, ...] on the grid of `scale` [rows] (broadcast)."""
        scale = scale.reshape(scale.shape + (1,) * (values.dim() - scale.dim()))
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        steps = torch.round(values / safe)
        steps = torch.where(scale == 0, torch.zeros_like(steps), steps)
        return (steps + self.zero).clamp_(self.lowest, self.highest).to(torch.int16)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 values of `codes`, computed as the format does: fp32(scale) * fp32(code - zero)."""
        scale = scale.reshape(scale.shape + (1,) * (codes.dim() - scale.dim()))
        return scale * (codes.to(torch.int32) - self.zero).to(torch.float32)


GRIDS: dict[str, BlockGrid] = {
    "Q8_0": BlockGrid("Q8_0", 8, lowest=-127, highest=127, zero=0, signed_extreme=False),
    "Q5_0": BlockGrid("Q5_0", 5, lowest=0, highest=31, zero=16, signed_extreme=True),
    "Q4_0": BlockGrid("Q4_0", 4, lowest=0, highest=15, zero=8, signed_extreme=True),
}


def grid(name: str) -> BlockGrid:
    if name not in GRIDS:
        raise ValueError(f"no block grid {name!r}; known: {', '.join(GRIDS)}")
    return GRIDS[name]


@dataclass
class BlockCodes:
    """A weight matrix on a grid: codes [rows, columns] (int16) and scales [rows, columns / block] (float32)."""

    grid: str
    codes: torch.Tensor
    scales: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        spec = grid(self.grid)
        rows, columns = self.codes.shape
        blocks = self.codes.reshape(rows, columns // spec.block, spec.block)
        return spec.dequantize(blocks, self.scales).reshape(rows, columns)

    def rows(self, start: int, stop: int) -> BlockCodes:
        return BlockCodes(self.grid, self.codes[start:stop], self.scales[start:stop])
