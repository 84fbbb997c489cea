"""Theoretical and actual compression rates (docs/metrics.md defines both)."""

from __future__ import annotations

BASELINE_BITS = 16


def tcr(sparsity: float, bits: float) -> float:
    """Theoretical compression rate against a 16-bit dense baseline: 1 - (q/16)(1 - s)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if bits <= 0:
        raise ValueError(f"bits must be positive, got {bits}")
    return 1.0 - (bits / BASELINE_BITS) * (1.0 - sparsity)


def actual_compression(artifact_bytes: int, f16_bytes: int) -> float:
    """1 - artifact/f16 bytes: what the file on disk really saves against an F16 export."""
    return 1.0 - artifact_bytes / f16_bytes
