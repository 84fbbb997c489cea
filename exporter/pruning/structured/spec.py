"""Structured pruning requests and reports: what to remove from the graph, and what was removed.

Unlike unstructured and N:M pruning, which zero weights the deployment formats then store at full
price, structured pruning removes whole decoder layers (depth), FFN channels and attention KV groups
(width), so the exported file is smaller and runs faster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from srcr.base.errors import SrcrError

DEPTH_METHODS = ("bi", "sleb")
WIDTH_METHODS = ("flap", "wanda-sp")
ALLOCATIONS = ("uniform", "global")


@dataclass(frozen=True)
class StructureSpec:
    drop_layers: float = 0.0  # fraction of decoder layers removed (whole layers, at least one when > 0)
    depth_method: str = "bi"  # "bi": ShortGPT's block influence; "sleb": greedy by calibration perplexity
    ffn_ratio: float = 0.0  # fraction of FFN channels removed (gate/up rows with their down_proj columns)
    head_ratio: float = 0.0  # fraction of KV groups removed (each with its query heads and o_proj columns)
    width_method: str = "flap"  # "flap" (fluctuation metric + bias compensation) or "wanda-sp"
    allocation: str = "uniform"  # "uniform": every layer keeps the same widths; "global": ranked across layers
    multiple: int = 1  # kept FFN widths are multiples of this (the quantizer's block); 1: no rounding
    sleb_samples: int = 8  # calibration samples SLEB scores each candidate removal on

    @property
    def active(self) -> bool:
        return self.drop_layers > 0 or self.ffn_ratio > 0 or self.head_ratio > 0

    @property
    def width(self) -> bool:
        return self.ffn_ratio > 0 or self.head_ratio > 0

    def label(self) -> str:
        """Part of a default output name, e.g. "bi-d20" or "flap-f25-h33"."""
        parts = []
        if self.drop_layers > 0:
            parts.append(f"{self.depth_method}-d{round(self.drop_layers * 100):02d}")
        if self.width:
            width = [self.width_method]
            if self.ffn_ratio > 0:
                width.append(f"f{round(self.ffn_ratio * 100):02d}")
            if self.head_ratio > 0:
                width.append(f"h{round(self.head_ratio * 100):02d}")
            if self.allocation == "global":
                width.append("g")
            parts.append("-".join(width))
        return "-".join(parts)


def check_structure(spec: StructureSpec) -> None:
    """The request alone, before any model is read."""
    for value, flag in (
        (spec.drop_layers, "--drop-layers"),
        (spec.ffn_ratio, "--ffn-ratio"),
        (spec.head_ratio, "--head-ratio"),
    ):
        if not (math.isfinite(value) and 0.0 <= value < 1.0):
            raise SrcrError(f"{flag} {value} is outside [0, 1); pass the fraction to remove, e.g. {flag} 0.25")
    if spec.depth_method not in DEPTH_METHODS:
        raise SrcrError(f"unknown --depth-method {spec.depth_method!r}; choose one of {', '.join(DEPTH_METHODS)}")
    if spec.width_method not in WIDTH_METHODS:
        raise SrcrError(f"unknown --width-method {spec.width_method!r}; choose one of {', '.join(WIDTH_METHODS)}")
    if spec.allocation not in ALLOCATIONS:
        raise SrcrError(f"unknown --width-allocation {spec.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if spec.multiple < 1:
        raise SrcrError(f"--width-multiple {spec.multiple} must be positive")
    if spec.sleb_samples < 1:
        raise SrcrError("SLEB needs at least one calibration sample")


def check_fits(config: object, spec: StructureSpec) -> None:
    """The request against the model's shapes, from its config (before any weight is loaded)."""
    layers = getattr(config, "num_hidden_layers", None)
    if spec.drop_layers > 0 and layers is not None and round(spec.drop_layers * layers) >= layers:
        raise SrcrError(f"--drop-layers {spec.drop_layers} removes all {layers} decoder layers; lower it")
    groups = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    if spec.head_ratio > 0 and groups is not None and groups - round(spec.head_ratio * groups) < 1:
        raise SrcrError(
            f"--head-ratio {spec.head_ratio} leaves none of the {groups} KV groups; attention needs one, lower it"
        )
    channels = getattr(config, "intermediate_size", None)
    if spec.ffn_ratio > 0 and channels is not None and channels * (1 - spec.ffn_ratio) < spec.multiple / 2:
        raise SrcrError(
            f"--ffn-ratio {spec.ffn_ratio} leaves fewer than half a block of {spec.multiple} of the "
            f"{channels} FFN channels; lower it or choose a quantization with smaller blocks"
        )


@dataclass(frozen=True)
class LayerWidths:
    layer: int  # index in the pruned model
    source_layer: int  # index in the source model
    ffn: int  # FFN channels kept
    heads: int  # query heads kept
    kv_heads: int  # key/value heads kept


@dataclass
class StructureReport:
    removed_layers: list[int]  # source-model indices of the decoder layers removed
    layer_scores: list[float]  # the depth method's score per source layer (empty without depth pruning)
    widths: list[LayerWidths]  # per remaining layer
    parameters_before: int
    parameters_after: int
    ffn_before: int
    kv_heads_before: int
    heads_before: int
    notes: list[str] = field(default_factory=list)  # e.g. how widths were rounded
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        """Parameters removed / parameters of the source model (embeddings included)."""
        return 1.0 - self.parameters_after / self.parameters_before

    @property
    def uniform(self) -> bool:
        return len({(w.ffn, w.heads, w.kv_heads) for w in self.widths}) <= 1
