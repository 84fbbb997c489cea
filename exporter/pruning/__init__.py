"""Pruning of a Hugging Face causal LM in place: magnitude, Wanda or SparseGPT; unstructured or N:M.

`prune_model` also returns the importance matrix (mean squared input per column of every pruned
linear) that llama.cpp's quantizers use. docs/pruning.md describes the methods and the driver.
"""

from exporter.pruning.driver import prune_model
from exporter.pruning.spec import METHODS, PruneReport, PruneSpec, parse_pattern

__all__ = ["METHODS", "PruneReport", "PruneSpec", "parse_pattern", "prune_model"]
