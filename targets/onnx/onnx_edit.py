"""Small helpers for editing an ONNX graph in place: initializer lookup, node replacement, fp16 storage."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

MS_DOMAIN = "com.microsoft"


class GraphEditor:
    """Initializers by name plus a list of node replacements applied in one pass (graph order kept)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.graph = model.graph
        self._initializers = {tensor.name: tensor for tensor in self.graph.initializer}
        self._replacements: dict[str, list[Any]] = {}

    def has_initializer(self, name: str) -> bool:
        return name in self._initializers

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self._initializers[name])

    def add_initializer(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        tensor = numpy_helper.from_array(np.ascontiguousarray(array), name)
        self.graph.initializer.append(tensor)
        self._initializers[name] = tensor
        return name

    def replace(self, node: Any, nodes: Iterable[Any]) -> None:
        """Put `nodes` where `node` is (by node name, which must be unique and non-empty)."""
        self._replacements[node.name] = list(nodes)

    def commit(self) -> None:
        new_nodes = []
        for node in self.graph.node:
            new_nodes.extend(self._replacements.get(node.name, [node]) if node.name else [node])
        self.graph.ClearField("node")
        self.graph.node.extend(new_nodes)
        self._replacements.clear()
        remove_unused_initializers(self.model)
        self._initializers = {tensor.name: tensor for tensor in self.graph.initializer}


def remove_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {output.name for output in model.graph.output}
    kept = [tensor for tensor in model.graph.initializer if tensor.name in used]
    if len(kept) != len(model.graph.initializer):
        model.graph.ClearField("initializer")
        model.graph.initializer.extend(kept)


def ensure_ms_opset(model: Any) -> None:
    from onnx import helper

    if not any(opset.domain == MS_DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def float16_faithful(array: np.ndarray, tolerance: float = 1e-3, keep_nonzero: bool = False) -> bool:
    """True when fp16 keeps every value within `tolerance` relative error (no overflow, no underflow), values
    below fp16's normal range within `tolerance` of its smallest normal. With `keep_nonzero` (block scales,
    which the levels are divided by), also no nonzero value may become zero."""
    as_half = array.astype(np.float16).astype(np.float32)
    if not np.all(np.isfinite(as_half)):
        return False
    if keep_nonzero and np.any((as_half == 0) & (array != 0)):
        return False
    scale = np.maximum(np.abs(array), np.finfo(np.float16).tiny)
    return bool(np.all(np.abs(as_half - array) <= tolerance * scale))


def store_as_float16(model: Any, names: Iterable[str], exact: bool = False, keep_nonzero: bool = False) -> list[str]:
    """Store fp32 initializers as fp16 behind a Cast back to fp32; return the names converted.

    ONNX Runtime folds Cast(initializer) at session load, so compute stays fp32 and only the file
    halves. Unless `exact` (plain weights, where fp16 rounding is the point), a tensor is left fp32
    when fp16 would lose more than 0.1% on any value (tiny scales of near-empty blocks underflow);
    `keep_nonzero` as in float16_faithful.
    """
    from onnx import TensorProto, helper, numpy_helper

    wanted = set(names)
    converted, casts = [], []
    for tensor in model.graph.initializer:
        if tensor.name not in wanted or tensor.data_type != TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if not exact and not float16_faithful(array, keep_nonzero=keep_nonzero):
            continue
        original = tensor.name
        tensor.CopyFrom(numpy_helper.from_array(array.astype(np.float16), f"{original}.f16"))
        casts.append(
            helper.make_node("Cast", [tensor.name], [original], name=f"{original}.to_float32", to=TensorProto.FLOAT)
        )
        converted.append(original)
    # Casts go first: their inputs are initializers, so graph order stays topological.
    nodes = casts + list(model.graph.node)
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return converted
