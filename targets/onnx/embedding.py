"""One stored copy of a tied token embedding / output projection.

The exporter writes a tied matrix twice: the embedding Gather reads E [vocab, hidden] and lm_head's
MatMul reads its folded transpose E^T [hidden, vocab]. Only one is kept:
  unquantized  lm_head multiplies by Transpose(E) (ONNX Runtime folds the transpose at load).
  quantized    the embedding lookup gathers rows of lm_head's MatMulNBits tensors and dequantizes
               them with standard ops. MatMulNBits stores the weight as [vocab, hidden/block, bytes],
               so row v of its levels, scales and zero points is exactly token v's embedding.
ONNX Runtime's GatherBlockQuantized cannot share those tensors (it wants scales of another rank and
integer zero points only), which is why the lookup is spelled out here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from srcr.targets.onnx.graph import WeightMap
from srcr.targets.onnx.matmul_nbits import unpack_table
from srcr.targets.onnx.onnx_edit import GraphEditor


def _attributes(node: Any) -> dict[str, int]:
    return {attribute.name: attribute.i for attribute in node.attribute}


def _owned_by(tensor: str, weight: str) -> bool:
    return tensor == weight or tensor.startswith((f"{weight}.", f"{weight}_"))


def _find_lm_head_nodes(model: Any, lm_head: str) -> tuple[Any | None, Any | None, Any | None]:
    """(plain MatMul, MatMulNBits, offsets MatMul) reading lm_head's tensors; absent ones are None.

    Found by the tensors they read, which keep the HF weight name through every quantizer.
    """
    plain = nbits = offsets = None
    for node in model.graph.node:
        weight_input = node.input[1] if len(node.input) > 1 else ""
        if node.op_type == "MatMul" and weight_input == lm_head:
            plain = node
        elif node.op_type == "MatMulNBits" and _owned_by(weight_input, lm_head):
            nbits = node
        elif node.op_type == "MatMul" and weight_input == f"{lm_head}.offsets":
            offsets = node
    return plain, nbits, offsets


def _embedding_gather(model: Any, embedding: str) -> Any:
    return next(node for node in model.graph.node if node.op_type == "Gather" and node.input[0] == embedding)


def share_tied_embedding(model: Any, weights: WeightMap) -> bool:
    """Drop the duplicate of a tied embedding in place; True if the graph now holds one copy."""
    if not weights.tied:
        return False
    plain, nbits, offsets = _find_lm_head_nodes(model, weights.lm_head)
    editor = GraphEditor(model)
    if plain is not None:
        return _share_float(editor, plain, weights.embedding)
    if nbits is not None:
        gather = _embedding_gather(model, weights.embedding)
        editor.replace(gather, _dequantizing_gather(editor, gather, nbits, offsets))
        editor.commit()
        return True
    return False


def _share_float(editor: GraphEditor, lm_head: Any, embedding: str) -> bool:
    from onnx import helper

    if not np.array_equal(editor.array(embedding), editor.array(lm_head.input[1]).T):
        return False
    transposed = f"{embedding}.transposed"
    transpose = helper.make_node("Transpose", [embedding], [transposed], name=f"{lm_head.name}.transpose", perm=[1, 0])
    matmul = helper.make_node("MatMul", [lm_head.input[0], transposed], list(lm_head.output), name=lm_head.name)
    editor.replace(lm_head, [transpose, matmul])
    editor.commit()
    return True


def _dequantizing_gather(editor: GraphEditor, gather: Any, nbits: Any, offsets_matmul: Any | None) -> list[Any]:
    """Nodes computing the embedding rows of `gather`'s ids from lm_head's MatMulNBits tensors."""
    from onnx import TensorProto, helper

    attrs = _attributes(nbits)
    bits, block_size, hidden = attrs["bits"], attrs["block_size"], attrs["K"]
    k_blocks = hidden // block_size
    ids, prefix = gather.input[1], gather.name
    table = editor.add_initializer(unpack_table(bits), f"{prefix}.unpack_{bits}bit")
    nodes: list[Any] = []

    def op(op_type: str, inputs: list[str], name: str, **attributes: Any) -> str:
        """Append one node; its output tensor and the node share `prefix.name`."""
        output = gather.output[0] if name == "rows" else f"{prefix}.{name}"
        nodes.append(helper.make_node(op_type, inputs, [output], name=f"{prefix}.{name}", **attributes))
        return output

    def const(values: list[int] | float, name: str) -> str:
        array = np.asarray(values, dtype=np.int64 if isinstance(values, list) else np.float32)
        return editor.add_initializer(array, f"{prefix}.{name}")

    def unpack(packed_rows: str, name: str) -> str:
        """uint8 [..., bytes] -> float levels [..., bytes, 8/bits] by table lookup (2, 4 and 8 bits alike)."""
        index = op("Cast", [packed_rows], f"{name}_index", to=TensorProto.INT32)
        return op("Gather", [table, index], name)

    column = const([0, 0, k_blocks, 1], "column_shape")
    levels = unpack(op("Gather", [nbits.input[1], ids], "bytes"), "levels")
    blocks = op("Reshape", [levels, const([0, 0, k_blocks, block_size], "block_shape")], "blocks")
    zero_points = nbits.input[3] if len(nbits.input) > 3 and nbits.input[3] else None
    if zero_points is None:
        zero = const(float(2 ** (bits - 1)), "default_zero_point")
    else:  # packed like B, along the blocks of a row, padded to whole bytes
        zero_bytes = editor.array(zero_points).shape[-1]
        zero_levels = unpack(op("Gather", [zero_points, ids], "zp_bytes"), "zp_levels")
        flat = op("Reshape", [zero_levels, const([0, 0, zero_bytes * (8 // bits)], "zp_flat_shape")], "zp_flat")
        used = op(
            "Slice", [flat, const([0], "zp_start"), const([k_blocks], "zp_end"), const([2], "zp_axis")], "zp_used"
        )
        zero = op("Reshape", [used, column], "zp")
    centred = op("Sub", [blocks, zero], "centred")
    scales = op("Reshape", [op("Gather", [nbits.input[2], ids], "scale_rows"), column], "scales")
    dequantized = op("Mul", [centred, scales], "scaled")
    if offsets_matmul is not None:
        # offsets are [K/block, vocab]: gather columns, then move the block axis last.
        columns = op("Gather", [offsets_matmul.input[1], ids], "offset_columns", axis=1)
        rows = op("Transpose", [columns], "offset_rows", perm=[1, 2, 0])
        dequantized = op("Add", [dequantized, op("Reshape", [rows, column], "offsets")], "shifted")
    op("Reshape", [dequantized, const([0, 0, hidden], "hidden_shape")], "rows")
    return nodes
