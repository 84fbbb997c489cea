"""Weight-only block quantization of the linear layers into ONNX Runtime's MatMulNBits.

Three ways to choose each block's integers, scale and zero point:
  rtn   ONNX Runtime's round-to-nearest (MatMulNBitsQuantizer's default config): integer zero points.
  hqq   ONNX Runtime's Half-Quadratic Quantization: float zero points optimized per block.
  wls   each block's [min, max] grid with a float zero point (llama.cpp's Q4_1 scheme), refined by a
        weighted least-squares search over grid spacings. Exact for weights already on such a grid.

MatMulNBits on CPU runs float zero points only through a slow path that dequantizes the whole
weight every call (~8x slower decode on SmolLM2). So a float zero point z is moved out of the op:
    (q - z) * s  ==  (q - m) * s  +  (m - z) * s,     m = 2^(bits-1), MatMulNBits' default zero point.
The first term is a MatMulNBits without zero points (the fast kernel); the second is constant per
block, so it adds (x summed per block) @ offsets: two small matmuls, [K, K/block] and [K/block, N].
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from srcr.base.grids import BlockCodes, grid
from srcr.targets.base import ProgressFn, no_progress
from srcr.targets.onnx.onnx_edit import MS_DOMAIN, GraphEditor, ensure_ms_opset, float16_faithful

ALGORITHMS = ("wls", "hqq", "rtn")


@dataclass(frozen=True)
class BlockQuantConfig:
    bits: int  # 2, 4 or 8
    block_size: int  # a power of two >= 16 that divides every input dimension
    algo: str  # one of ALGORITHMS
    symmetric: bool  # rtn only: no zero points, levels centred on zero


def pack_blocks(levels: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """uint8 [N, K/block, block*bits/8] from integer levels [N, K]: MatMulNBits' B layout, low bits first."""
    rows, cols = levels.shape
    per_byte = 8 // bits
    grouped = levels.astype(np.uint8).reshape(rows, cols // block_size, block_size // per_byte, per_byte)
    packed = np.zeros(grouped.shape[:-1], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grouped[..., slot] << np.uint8(bits * slot)
    return packed


def unpack_table(bits: int) -> np.ndarray:
    """float32 [256, 8/bits]: the levels stored in each possible byte, in packing order."""
    per_byte = 8 // bits
    byte = np.arange(256, dtype=np.uint32)[:, None]
    shifts = bits * np.arange(per_byte, dtype=np.uint32)[None, :]
    return ((byte >> shifts) & ((1 << bits) - 1)).astype(np.float32)


def _fp16_scales(scales: np.ndarray) -> np.ndarray:
    """The scales as they will be stored (fp16 where faithful), so levels are chosen against them."""
    return scales.astype(np.float16).astype(np.float32) if float16_faithful(scales, keep_nonzero=True) else scales


def _least_squares_fit(
    blocks: np.ndarray, importance: np.ndarray, levels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block, the (scale, minimum) minimizing sum importance * (scale * level + minimum - w)^2, and its error."""
    total = importance.sum(-1)
    weighted_levels = importance * levels
    sum_l, sum_ll = weighted_levels.sum(-1), (weighted_levels * levels).sum(-1)
    sum_x, sum_lx = (importance * blocks).sum(-1), (weighted_levels * blocks).sum(-1)
    determinant = total * sum_ll - sum_l * sum_l
    solvable = determinant > 0
    safe = np.where(solvable, determinant, 1.0)
    scale = np.where(solvable, (total * sum_lx - sum_x * sum_l) / safe, 0.0)
    minimum = np.where(solvable, (sum_ll * sum_x - sum_l * sum_lx) / safe, 0.0)
    error = (importance * (scale[:, None] * levels + minimum[:, None] - blocks) ** 2).sum(-1)
    return scale, minimum, np.where(solvable & (scale > 0), error, np.inf)


def _importance(blocks: np.ndarray, rows: int, column_importance: np.ndarray | None) -> np.ndarray:
    """How much each weight's error counts: |w| + rms(block), or with an imatrix (mean x^2 of each
    input column) that times sqrt(w^2 + mean w^2), as llama.cpp weighs its k-quant search."""
    if column_importance is None:
        return np.abs(blocks) + np.sqrt((blocks**2).mean(axis=-1, keepdims=True))
    per_block = column_importance.astype(np.float32).reshape(1, -1, blocks.shape[-1])
    columns = np.broadcast_to(per_block, (rows, *per_block.shape[1:])).reshape(blocks.shape)
    return columns * np.sqrt(blocks**2 + (blocks**2).mean(axis=-1, keepdims=True))


def wls_blocks(
    weight_t: np.ndarray,
    bits: int,
    block_size: int,
    steps: int = 20,
    column_importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(levels [N, K], scales [N, K/block], float zero points [N, K/block]) with w = (level - zero) * scale.

    Each block starts from its min/max grid (exact for weights already on such a grid, e.g. a Q4_1
    checkpoint) and tries `steps` slightly different grid spacings; for each, the levels are rounded
    and (scale, minimum) refit by weighted least squares, keeping whatever lowers the error (weights:
    `_importance`, with the imatrix entry of this matrix as `column_importance` when there is one).
    """
    rows, cols = weight_t.shape
    blocks = weight_t.reshape(-1, block_size).astype(np.float32)
    top = float(2**bits - 1)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    spread = np.where(high > low, high - low, 1.0).astype(np.float32)
    importance = _importance(blocks, rows, column_importance)
    scale, minimum = spread / top, low
    levels = np.clip(np.round((blocks - low[:, None]) / scale[:, None]), 0, top)
    error = (importance * (scale[:, None] * levels + minimum[:, None] - blocks) ** 2).sum(-1)
    # Blocks already on a grid are done; refine the rest only (all of them for a typical checkpoint).
    todo = np.flatnonzero(error > 1e-10 * (importance.sum(-1) * spread**2))
    for start in range(0, len(todo), 1 << 16):
        chunk = todo[start : start + (1 << 16)]
        x, weight, base, width = blocks[chunk], importance[chunk], low[chunk, None], spread[chunk, None]
        for step in range(steps + 1):
            candidate = np.clip(np.round((top - 0.5 + step / steps) / width * (x - base)), 0, top)
            step_scale, step_min, step_error = _least_squares_fit(x, weight, candidate)
            better = step_error < error[chunk]
            error[chunk[better]] = step_error[better]
            scale[chunk[better]] = step_scale[better]
            minimum[chunk[better]] = step_min[better]
    scales = _fp16_scales(scale.astype(np.float32))
    zeros = -minimum / scales
    levels = np.clip(np.round(blocks / scales[:, None] + zeros[:, None]), 0, top)
    k_blocks = cols // block_size
    return (
        levels.reshape(rows, cols).astype(np.uint8),
        scales.reshape(rows, k_blocks),
        zeros.reshape(rows, k_blocks).astype(np.float32),
    )


class _BlockOffsetWriter:
    """Emits MatMulNBits (default zero point) + block-sum offsets for weights with float zero points."""

    def __init__(self, editor: GraphEditor) -> None:
        self.editor = editor
        self._block_sums: dict[tuple[int, int], str] = {}

    def block_sum_matrix(self, rows: int, block_size: int) -> str:
        """[K, K/block] of ones and zeros: x @ it sums x over each block. One per (K, block)."""
        key = (rows, block_size)
        if key not in self._block_sums:
            matrix = np.zeros((rows, rows // block_size), dtype=np.float32)
            matrix[np.arange(rows), np.arange(rows) // block_size] = 1.0
            self._block_sums[key] = self.editor.add_initializer(matrix, f"block_sum.{rows}.{block_size}")
        return self._block_sums[key]

    def nodes(
        self,
        node: Any,
        weight: str,
        packed: np.ndarray,
        scales: np.ndarray,
        zeros: np.ndarray,
        bits: int,
        block_size: int,
    ) -> list[Any]:
        from onnx import helper

        columns, k_blocks = scales.shape
        rows = k_blocks * block_size
        offsets = ((2 ** (bits - 1) - zeros) * scales).T  # [K/block, N]
        b_name = self.editor.add_initializer(packed, f"{weight}.q{bits}")
        s_name = self.editor.add_initializer(scales.astype(np.float32), f"{weight}.scales")
        o_name = self.editor.add_initializer(offsets.astype(np.float32), f"{weight}.offsets")
        x, y = node.input[0], node.output[0]
        return [
            helper.make_node(
                "MatMulNBits",
                [x, b_name, s_name],
                [f"{y}.levels"],
                name=f"{node.name}.nbits",
                domain=MS_DOMAIN,
                K=rows,
                N=columns,
                bits=bits,
                block_size=block_size,
            ),
            helper.make_node(
                "MatMul", [x, self.block_sum_matrix(rows, block_size)], [f"{y}.block_sums"], name=f"{node.name}.sums"
            ),
            helper.make_node("MatMul", [f"{y}.block_sums", o_name], [f"{y}.offsets"], name=f"{node.name}.offsets"),
            helper.make_node("Add", [f"{y}.levels", f"{y}.offsets"], [y], name=f"{node.name}.add"),
        ]


def _quantize_wls(
    model: Any,
    linear: dict[str, str],
    configs: Mapping[str, BlockQuantConfig],
    imatrix: dict[str, np.ndarray],
    progress: ProgressFn,
) -> None:
    editor = GraphEditor(model)
    writer = _BlockOffsetWriter(editor)
    by_node = {node_name: weight for weight, node_name in linear.items()}
    done = 0
    for node in list(model.graph.node):
        weight = by_node.get(node.name)
        if weight is None:
            continue
        weight_t = editor.array(node.input[1]).T  # MatMul stores [in, out]; blocks run along `in`
        column_importance = imatrix.get(weight)
        if column_importance is not None and column_importance.size != weight_t.shape[1]:
            raise ValueError(
                f"imatrix entry {weight} has {column_importance.size} values for {weight_t.shape[1]} inputs"
            )
        config = configs[weight]
        levels, scales, zeros = wls_blocks(
            weight_t, config.bits, config.block_size, column_importance=column_importance
        )
        packed = pack_blocks(levels, config.bits, config.block_size)
        editor.replace(node, writer.nodes(node, weight, packed, scales, zeros, config.bits, config.block_size))
        done += 1
        progress("quantize", done, len(linear))
    editor.commit()
    ensure_ms_opset(model)


@contextlib.contextmanager
def quiet_ort_quantizers() -> Iterator[None]:
    """ORT's quantizers log every node at INFO (and matmul_nbits_quantizer sets up the root logger
    on import); keep the CLI's output readable while they run."""
    names = ("", "onnxruntime", "onnxruntime.quantization.matmul_nbits_quantizer")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _quantize_with_ort(model: Any, linear: dict[str, str], config: BlockQuantConfig) -> Any:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        HQQWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    if config.algo == "hqq":
        algo_config = HQQWeightOnlyQuantConfig(block_size=config.block_size, bits=config.bits)
    else:
        algo_config = DefaultWeightOnlyQuantConfig(
            block_size=config.block_size, is_symmetric=config.symmetric, bits=config.bits
        )
    targets = set(linear.values())
    others = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in targets]
    with quiet_ort_quantizers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # HQQ hands torch a read-only numpy view; harmless
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=config.bits,
            block_size=config.block_size,
            is_symmetric=config.symmetric,
            nodes_to_exclude=others,
            algo_config=algo_config,
        )
        quantizer.process()
    return quantizer.model.model


def _float_zero_points_to_offsets(model: Any, linear: dict[str, str]) -> None:
    """Rewrite every MatMulNBits with float zero points (HQQ's output) into the fast layout."""
    from onnx import TensorProto

    editor = GraphEditor(model)
    writer = _BlockOffsetWriter(editor)
    float_types = (TensorProto.FLOAT, TensorProto.FLOAT16)
    zero_types = {tensor.name: tensor.data_type for tensor in model.graph.initializer}
    weights_by_b = {}
    for weight in linear:
        weights_by_b.update({f"{weight}_Q{bits}": weight for bits in (2, 4, 8)})
    for node in list(model.graph.node):
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or zero_types.get(node.input[3]) not in float_types:
            continue
        attrs = {attribute.name: attribute.i for attribute in node.attribute}
        bits, block_size, columns = attrs["bits"], attrs["block_size"], attrs["N"]
        k_blocks = attrs["K"] // block_size
        scales = editor.array(node.input[2]).astype(np.float32).reshape(columns, k_blocks)
        zeros = editor.array(node.input[3]).astype(np.float32).reshape(columns, k_blocks)
        packed = editor.array(node.input[1])
        weight = weights_by_b.get(node.input[1], node.input[1])
        editor.replace(node, writer.nodes(node, weight, packed, scales, zeros, bits, block_size))
    editor.commit()


def pack_zero_points(points: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero_points from integer points [N, K/block]: uint8, 8 / bits to a byte (low bits
    first), each row padded to whole bytes."""
    per_byte = 8 // bits
    rows, blocks = points.shape
    padded = np.zeros((rows, -(-blocks // per_byte) * per_byte), dtype=np.uint8)
    padded[:, :blocks] = points
    return pack_blocks(padded, bits, padded.shape[1]).reshape(-1)  # one "block" per row


def write_codes(model: Any, linear: dict[str, str], codes: Mapping[str, BlockCodes], progress: ProgressFn) -> None:
    """Replace the MatMuls of the weights in `codes` by MatMulNBits holding exactly those codes, scales
    and (grids with a zero point) zero points: no quantization happens here."""
    editor = GraphEditor(model)
    by_node = {linear[name]: name for name in codes}
    done = 0
    for node in list(model.graph.node):
        weight = by_node.get(node.name)
        if weight is None:
            continue
        editor.replace(node, [codes_node(editor, node, weight, codes[weight])])
        done += 1
        progress("quantize", done, len(linear))
    editor.commit()
    ensure_ms_opset(model)


def codes_node(editor: GraphEditor, node: Any, weight: str, matrix: BlockCodes) -> Any:
    """One MatMulNBits for `node` (a MatMul by [in, out] `weight`) from codes on a MatMulNBits grid."""
    from onnx import helper

    spec = grid(matrix.grid)
    if not spec.name.startswith("MatMulNBits"):
        raise ValueError(f"{weight}: codes on {spec.name} are not a MatMulNBits grid")
    columns, rows = matrix.codes.shape  # [out, in]: blocks run along the input
    stored = editor.array(node.input[1]).shape if editor.has_initializer(node.input[1]) else None
    if stored != (rows, columns):
        raise ValueError(f"{weight}: the graph's MatMul holds {stored}, the codes are for [{rows}, {columns}]")
    levels = matrix.codes.cpu().numpy()
    inputs = [
        node.input[0],
        editor.add_initializer(pack_blocks(levels, spec.bits, spec.block), f"{weight}.q{spec.bits}"),
        editor.add_initializer(matrix.scales.cpu().numpy().astype(np.float32), f"{weight}.scales"),
    ]
    if matrix.offsets is not None:
        points = pack_zero_points(matrix.offsets.cpu().numpy(), spec.bits)
        inputs.append(editor.add_initializer(points, f"{weight}.zero_points"))
    return helper.make_node(
        "MatMulNBits",
        inputs,
        list(node.output),
        name=f"{node.name}.nbits",
        domain=MS_DOMAIN,
        K=rows,
        N=columns,
        bits=spec.bits,
        block_size=spec.block,
    )


def quantize_linear_weights(
    model: Any,
    linear: dict[str, str],
    config: BlockQuantConfig,
    imatrix: dict[str, np.ndarray] | None = None,
    progress: ProgressFn = no_progress,
    per_weight: Mapping[str, BlockQuantConfig] | None = None,
) -> Any:
    """Quantize the MatMuls in `linear` (HF weight name -> node name); return the (possibly new) model.

    `imatrix` (HF weight name -> mean x^2 per input column) weighs the wls search; rtn and hqq ignore it.
    `per_weight` (wls only: a budget's allocation) gives weights their own bits and block size.
    """
    progress("quantize", 0, len(linear))
    if config.algo == "wls":
        _quantize_wls(
            model, linear, {name: (per_weight or {}).get(name, config) for name in linear}, imatrix or {}, progress
        )
    else:
        model = _quantize_with_ort(model, linear, config)
        _float_zero_points_to_offsets(model, linear)
    progress("quantize", len(linear), len(linear))
    return model


def quantized_weight_tensors(model: Any, weight: str) -> list[str]:
    """Names of the initializers that hold `weight` after quantization (levels, scales, zero points, offsets)."""
    prefixes = (f"{weight}.", f"{weight}_")
    return [tensor.name for tensor in model.graph.initializer if tensor.name.startswith(prefixes)]
