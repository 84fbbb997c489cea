"""An ONNX graph for a byte budget: MatMulNBits bits and block size per linear layer, from measured sensitivities.

Every linear layer may be stored as any of ONNX Runtime's MatMulNBits widths (2, 4 or 8 bits) in blocks of
32, 64 or 128 inputs (those that divide its input width), quantized by srcr's wls search with the importance
matrix. Each option is scored by the relative error of exactly the weights the graph computes with (levels,
scales and offsets as stored, see `stored_weight`) on the layer's KL curve (exporter/sensitivity.py),
and srcr.base.allocation picks the mix that fits. A token embedding that is not tied stays fp16 (the lookup
is no MatMul): it is part of the fixed bytes, as are norms, the tokenizer and the graph itself.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from srcr.base.allocation import (
    Allocation,
    KlCurve,
    Option,
    WholeModelCheck,
    WholeModelKl,
    allocate_file,
    relative_error,
)
from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress
from srcr.targets.base import BudgetRequest
from srcr.targets.onnx.graph import WeightMap
from srcr.targets.onnx.matmul_nbits import BlockQuantConfig, wls_blocks
from srcr.targets.onnx.onnx_edit import GraphEditor, float16_faithful
from srcr.targets.onnx.spec import BUDGET_MIN_BLOCK

BITS = (2, 4, 8)
# Every input width must be a multiple of the smallest block (spec.check_block_size_fits), so every layer
# has all three widths.
BLOCK_SIZES = (BUDGET_MIN_BLOCK, 2 * BUDGET_MIN_BLOCK, 4 * BUDGET_MIN_BLOCK)
# A layer srcr has no sensitivity for is pinned to this.
UNMEASURED = BlockQuantConfig(bits=8, block_size=32, algo="wls", symmetric=False)
# Average bits per weight a budget may ask for: 2-bit blocks of 128 .. 8-bit blocks of 32, each block with
# an fp16 scale and an fp16 offset (32 bits).
BPW_RANGE = (2 + 32 / 128, 8 + 32 / 32)
# Room beside each layer's measured structure (`_layer_structure_bytes`): the stand-in's K and N are
# shorter varints than the layer's.
LAYER_SLACK = 32
# The srcr.* metadata beside the tokenizer (model facts, quantization summary, versions): about 650 bytes.
METADATA_BYTES = 4096
# A tied embedding read from the quantized head: the dequantizing lookup's nodes and its unpack table.
TIED_LOOKUP_BYTES = 8192
_LABEL = re.compile(r"^MatMulNBits-q(?P<bits>\d)-wls-b(?P<block>\d+)$")


def label(config: BlockQuantConfig) -> str:
    return f"MatMulNBits-q{config.bits}-wls-b{config.block_size}"


def config_of(name: str) -> BlockQuantConfig:
    """The config behind an option's label (an allocation read back from a manifest is untrusted)."""
    match = _LABEL.match(name)
    if match is None or int(match["bits"]) not in BITS or int(match["block"]) not in BLOCK_SIZES:
        raise SrcrError(f"{name!r} is not a MatMulNBits option srcr allocates")
    return BlockQuantConfig(int(match["bits"]), int(match["block"]), "wls", symmetric=False)


def stored_weight(
    weight_t: np.ndarray, config: BlockQuantConfig, importance: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """(the [out, in] weight the graph computes with, the bytes its tensors take) for `config`.

    As matmul_nbits writes it: levels q with MatMulNBits' default zero point m and the block's scale s, plus
    a per-block offset (m - z) s; scales and offsets are stored fp16 where that is faithful, else fp32."""
    rows, columns = weight_t.shape
    levels, scales, zeros = wls_blocks(weight_t, config.bits, config.block_size, column_importance=importance)
    middle = 2 ** (config.bits - 1)
    offsets = (middle - zeros) * scales
    scales, scale_bytes = _as_stored(scales, keep_nonzero=True)
    offsets, offset_bytes = _as_stored(offsets, keep_nonzero=False)
    blocks = levels.reshape(rows, -1, config.block_size).astype(np.float32) - middle
    values = blocks * scales[..., None] + offsets[..., None]
    levels_bytes = rows * columns * config.bits // 8
    return values.reshape(rows, columns), levels_bytes + (scale_bytes + offset_bytes) * scales.size


def _as_stored(array: np.ndarray, keep_nonzero: bool) -> tuple[np.ndarray, int]:
    if float16_faithful(array, keep_nonzero=keep_nonzero):
        return array.astype(np.float16).astype(np.float32), 2
    return array.astype(np.float32), 4


def candidates(columns: int) -> list[BlockQuantConfig]:
    return [
        BlockQuantConfig(bits, block, "wls", symmetric=False)
        for bits in BITS
        for block in BLOCK_SIZES
        if columns % block == 0
    ]


def layer_options(weight_t: np.ndarray, importance: np.ndarray | None, curve: KlCurve) -> list[Option]:
    """Every MatMulNBits option for this [out, in] weight, with its bytes and predicted KL.

    The options are scored in threads, one per core: wls' numpy work releases the GIL."""
    configs = candidates(weight_t.shape[1])
    if not configs:
        raise SrcrError(
            f"an input width of {weight_t.shape[1]} is no multiple of {BUDGET_MIN_BLOCK}; MatMulNBits cannot hold it"
        )

    def score(config: BlockQuantConfig) -> Option:
        values, stored_bytes = stored_weight(weight_t, config, importance)
        return Option(label(config), stored_bytes, curve(relative_error(weight_t, values, importance)))

    with ThreadPoolExecutor(max_workers=min(len(configs), os.cpu_count() or 1)) as pool:
        return list(pool.map(score, configs))


def smallest_bytes(rows: int, columns: int) -> int:
    """The fewest bytes any option stores a [rows, columns] weight in (2 bits, the largest block, fp16)."""
    block = max((size for size in BLOCK_SIZES if columns % size == 0), default=BUDGET_MIN_BLOCK)
    return rows * columns * BITS[0] // 8 + 4 * rows * (columns // block)


def _block_sum_bytes(widths: set[int]) -> int:
    """The [K, K/block] fp16 block-sum matrices the offsets need, for every block size a K might get."""
    return sum(2 * width * (width // block) for width in widths for block in BLOCK_SIZES if width % block == 0)


def _layer_structure_bytes(proto: object, weight: str, node_name: str) -> int:
    """The graph bytes quantizing this layer adds beyond its tensors' data (its nodes, Casts, initializers'
    names and shapes): measured by quantizing a one-block stand-in under the same names."""
    from onnx import TensorProto, helper, numpy_helper

    from srcr.targets.onnx.artifact import tensor_bytes
    from srcr.targets.onnx.quantize import quantize_graph
    from srcr.targets.onnx.spec import resolve

    node = next(node for node in proto.graph.node if node.name == node_name)  # type: ignore[attr-defined]
    standin = numpy_helper.from_array(np.linspace(-1, 1, BUDGET_MIN_BLOCK, dtype=np.float32)[:, None], weight)
    stand_node = helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node_name)
    value = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
    graph = helper.make_graph([stand_node], "layer", [], [value], [standin])
    model = helper.make_model(graph)

    def structure(model: object) -> int:
        return model.ByteSize() - sum(tensor_bytes(model).values())  # type: ignore[attr-defined]

    before = structure(model)
    single = WeightMap(linear={weight: node_name}, embedding=None, lm_head=None, tied=False)
    spec = resolve(None, None, {"budget_mb": 1.0})
    config = BlockQuantConfig(BITS[0], BUDGET_MIN_BLOCK, "wls", symmetric=False)
    quantized = quantize_graph(model, single, spec, None, per_weight={weight: config})  # type: ignore[arg-type]
    return structure(quantized.model) - before + LAYER_SLACK


def fixed_bytes(proto: object, weights: WeightMap, tokenizer_bytes: int) -> int:
    """What the artifact stores beside the linear layers' quantized tensors, from the fp32 graph: the other
    initializers (an untied embedding at fp16, a tied one shared with the head), the graph's structure and
    what quantizing each layer adds to it, the metadata, and every block-sum matrix the layers could need."""
    from srcr.targets.onnx.artifact import tensor_bytes

    sizes = tensor_bytes(proto)
    editor = GraphEditor(proto)
    linear = set(weights.linear)
    others = 0
    for name, size in sizes.items():
        if name in linear:
            continue
        if name == weights.embedding:
            others += 0 if weights.tied else size // 2
        else:
            others += size
    structure = proto.ByteSize() - sum(sizes.values())  # type: ignore[attr-defined]
    widths = {editor.array(name).shape[0] for name in linear}  # MatMul stores [in, out]
    layers = sum(_layer_structure_bytes(proto, name, node) for name, node in weights.linear.items())
    lookup = TIED_LOOKUP_BYTES if weights.tied else 0
    return others + structure + layers + lookup + METADATA_BYTES + tokenizer_bytes + _block_sum_bytes(widths)


def allocate_layers(
    proto: object,
    weights: WeightMap,
    request: BudgetRequest,
    sensitivity: Mapping[str, KlCurve],
    imatrix: Mapping[str, np.ndarray],
    tokenizer_bytes: int,
    progress: ProgressFn = no_progress,
    whole_model_kl: WholeModelKl | None = None,
) -> Allocation:
    """The MatMulNBits option of every linear layer (by Hugging Face weight name) so that the artifact fits
    `request` (MB, or bits per weight over the linear layers). A tied output
    head takes the sensitivity measured for the embedding it shares. With `whole_model_kl`, the additive
    choice and its alternatives are measured with every layer's stored weights in place, and the best kept."""
    editor = GraphEditor(proto)
    fixed = fixed_bytes(proto, weights, tokenizer_bytes)
    n_weights = sum(int(editor.array(name).size) for name in weights.linear)
    if request.key == "budget_bpw":
        tensor_budget = int(request.value * n_weights / 8)
        budget_bytes = tensor_budget + fixed
    else:
        budget_bytes = int(request.value * 1e6)
        tensor_budget = budget_bytes - fixed
    options: dict[str, list[Option]] = {}
    pinned: dict[str, Option] = {}
    for done, name in enumerate(weights.linear):
        weight_t = editor.array(name).T  # MatMul stores [in, out]
        measured = weights.embedding if weights.tied and name == weights.lm_head else name
        if measured in sensitivity:
            options[name] = layer_options(weight_t, imatrix.get(name), sensitivity[measured])
        else:
            _, stored_bytes = stored_weight(weight_t, UNMEASURED, imatrix.get(name))
            pinned[name] = Option(label(UNMEASURED), stored_bytes, 0.0)
        progress(f"score widths {done + 1}/{len(weights.linear)}", done + 1, len(weights.linear))
    check = None
    if whole_model_kl is not None:

        def approximate(name: str, chosen: str) -> np.ndarray:
            return stored_weight(editor.array(name).T, config_of(chosen), imatrix.get(name))[0]

        check = WholeModelCheck(approximate, whole_model_kl)
    return allocate_file(options, pinned, budget_bytes, tensor_budget, "ONNX graph", check, progress)


def check_written_as_allocated(proto: object, allocation: Allocation, artifact_bytes: int) -> None:
    """Every layer is a MatMulNBits of the bits and block size chosen for it, and the file fits the budget."""
    written = {}
    for node in proto.graph.node:  # type: ignore[attr-defined]
        if node.op_type == "MatMulNBits":
            attributes = {attribute.name: attribute.i for attribute in node.attribute}
            written[node.input[1]] = (attributes["bits"], attributes["block_size"])
    for name, chosen in sorted(allocation.types.items()):
        config = config_of(chosen)
        if written.get(f"{name}.q{config.bits}") != (config.bits, config.block_size):
            raise SrcrError(f"{name} was not written as the {chosen} chosen for it; report this with the model")
    if artifact_bytes > allocation.budget_bytes:
        raise SrcrError(
            f"the file came out {artifact_bytes:,} bytes, over the budget of {allocation.budget_bytes:,}; report this"
        )
