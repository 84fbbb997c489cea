"""Structured pruning: remove decoder layers (depth) and FFN channels / KV groups (width) from the graph."""

from srcr.exporter.pruning.structured.engine import prune_structure
from srcr.exporter.pruning.structured.spec import (
    LayerWidths,
    StructureReport,
    StructureSpec,
    check_fits,
    check_structure,
)
from srcr.exporter.pruning.structured.surgery import check_layout

__all__ = [
    "LayerWidths",
    "check_layout",
    "StructureReport",
    "StructureSpec",
    "check_fits",
    "check_structure",
    "prune_structure",
]
