"""Applying a resolved QuantSpec to the exported fp32 graph (weight-only blocks, dynamic int8, or floats)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srcr.base.grids import BlockCodes
from srcr.targets.base import ProgressFn, QuantSpec, no_progress
from srcr.targets.onnx import spec as specs
from srcr.targets.onnx.graph import WeightMap
from srcr.targets.onnx.matmul_nbits import BlockQuantConfig, quiet_ort_quantizers


@dataclass
class Quantized:
    model: Any
    embedding_quantized: bool
    embedding_shared: bool
    quantized_weights: list[str]  # HF weight names whose stored form is quantized
    imatrix_used: bool = False
    gptq_weights: list[str] = field(default_factory=list)  # written from srcr's GPTQ codes
    ort_weights: list[str] = field(default_factory=list)  # quantized here (wls, hqq or rtn)


def quantize_graph(
    proto: Any,
    weights: WeightMap,
    spec: QuantSpec,
    workdir: Path,
    imatrix: dict[str, np.ndarray] | None = None,
    progress: ProgressFn = no_progress,
    codes: Mapping[str, BlockCodes] | None = None,
    per_weight: Mapping[str, BlockQuantConfig] | None = None,
) -> Quantized:
    """The quantized graph (`proto` is edited in place or replaced), and what was quantized or shared.

    With `codes` (srcr's GPTQ, spec.grid) those weights are written as they are; the other linear
    weights (an untied or tied output head) are quantized by `wls` at the same width and block size.
    With `per_weight` (a budget's allocation: every linear weight's wls bits and block size) each
    weight is quantized as given.
    """
    from srcr.targets.onnx.embedding import share_tied_embedding
    from srcr.targets.onnx.matmul_nbits import quantize_linear_weights, write_codes
    from srcr.targets.onnx.onnx_edit import store_as_float16

    scheme = spec.options["scheme"]
    if scheme == specs.DYNAMIC:
        return _quantize_dynamic(proto, weights, workdir)
    if scheme == specs.UNQUANTIZED:
        shared = share_tied_embedding(proto, weights)
        if spec.bits == 16:
            store_as_float16(proto, [*weights.linear, weights.embedding or ""], exact=True)
        return Quantized(proto, embedding_quantized=False, embedding_shared=shared, quantized_weights=[])
    codes = codes or {}
    if spec.grid is not None:
        if set(codes) - set(weights.linear) or not codes:
            raise ValueError(f"the GPTQ codes name {len(codes)} weights; the graph's linear layers differ")
        write_codes(proto, weights.linear, codes, progress)
        rest = {name: node for name, node in weights.linear.items() if name not in codes}
        config = BlockQuantConfig(spec.bits, spec.options["block_size"], "wls", symmetric=False)
    elif per_weight is not None:
        rest = weights.linear
        if set(per_weight) != set(rest):
            raise ValueError(f"the allocation names {len(per_weight)} weights; the graph has {len(rest)} linear layers")
        config = next(iter(per_weight.values()))
    else:
        rest = weights.linear
        config = BlockQuantConfig(
            bits=spec.bits,
            block_size=spec.options["block_size"],
            algo=spec.options["algo"],
            symmetric=spec.options["symmetric"],
        )
    if rest:
        proto = quantize_linear_weights(proto, rest, config, imatrix, progress, per_weight)
    imatrix_used = config.algo == "wls" and any(name in (imatrix or {}) for name in rest)
    shared = share_tied_embedding(proto, weights)
    if not shared and weights.embedding:
        store_as_float16(proto, [weights.embedding], exact=True)
    # Scales, offsets and block-sum matrices are stored fp16 wherever that is faithful (see onnx_edit).
    # A scale that fp16 would flush to zero keeps its tensor fp32: the levels are chosen by dividing by it.
    names = [tensor.name for tensor in proto.graph.initializer]
    store_as_float16(proto, [name for name in names if name.endswith((".scales", "_scales"))], keep_nonzero=True)
    store_as_float16(proto, [name for name in names if name.endswith(".offsets") or name.startswith("block_sum.")])
    quantized = list(weights.linear)
    return Quantized(proto, shared, shared, quantized, imatrix_used, gptq_weights=list(codes), ort_weights=list(rest))


def _quantize_dynamic(proto: Any, weights: WeightMap, workdir: Path) -> Quantized:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from srcr.targets.onnx.artifact import EXTERNAL_DATA_THRESHOLD, tensor_bytes

    source, target = workdir / "float.onnx", workdir / "dynamic.onnx"
    large = sum(tensor_bytes(proto).values()) >= EXTERNAL_DATA_THRESHOLD
    onnx.save_model(proto, str(source), save_as_external_data=large, location="float.onnx.data")
    with quiet_ort_quantizers():
        quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=large)
    quantized = onnx.load(str(target))
    stored = {tensor.name for tensor in quantized.graph.initializer}
    embedding_quantized = bool(weights.embedding) and weights.embedding not in stored
    names = [name for name in weights.linear if name not in stored]
    return Quantized(quantized, embedding_quantized, embedding_shared=False, quantized_weights=names)
