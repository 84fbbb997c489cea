"""Theoretical and actual compression rates (docs/metrics.md defines both)."""

from __future__ import annotations

BASELINE_BITS = 16


def tcr(sparsity: float, bits: float, removed: float = 0.0) -> float:
    """Theoretical compression rate against a 16-bit dense baseline: 1 - (q/16)(1 - r)(1 - s).

    `sparsity` s is the fraction of weights zeroed (unstructured or N:M), `removed` r the fraction of
    the model's parameters that structured pruning took out of the graph; with r = 0 this is the
    paper's 1 - (q/16)(1 - s).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 <= removed < 1.0:
        raise ValueError(f"removed fraction must be in [0, 1), got {removed}")
    if bits <= 0:
        raise ValueError(f"bits must be positive, got {bits}")
    return 1.0 - (bits / BASELINE_BITS) * (1.0 - removed) * (1.0 - sparsity)


def baseline_bytes(source_parameters: int) -> int:
    """The 16-bit baseline every format is compared with: each parameter of the dense source model
    (a tied embedding counted once) at 2 bytes, and nothing else.

    It depends on the source model alone, so a GGUF and an ONNX export of one model share it, and
    a file's own overheads (header, tokenizer, metadata) count against its compression.
    """
    if source_parameters <= 0:
        raise ValueError(f"the source model must have parameters, got {source_parameters}")
    return 2 * source_parameters


def actual_compression(artifact_bytes: int, baseline: int) -> float:
    """1 - artifact bytes / baseline bytes: what the file on disk really saves."""
    return 1.0 - artifact_bytes / baseline
