"""Pruning of a Hugging Face causal LM in place: magnitude, Wanda or SparseGPT; unstructured or N:M.

`prune_model` also returns the importance matrix (mean squared input per column of every pruned
linear) that llama.cpp's quantizers use. docs/pruning.md describes the methods and the driver;
docs/architecture.md how to add one.
"""

from srcr.exporter.pruning.driver import check_prunable, prune_model
from srcr.exporter.pruning.registry import METHODS, validate_spec
from srcr.exporter.pruning.spec import LayerSparsity, PruneReport, PruneSpec, parse_pattern

__all__ = [
    "METHODS",
    "LayerSparsity",
    "PruneReport",
    "PruneSpec",
    "check_prunable",
    "parse_pattern",
    "prune_model",
    "validate_spec",
]
