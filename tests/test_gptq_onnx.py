"""srcr's GPTQ written into ONNX Runtime's MatMulNBits: exact in the file, runs, refuses what it can't write.

The oracle for "exact" is ONNX Runtime itself: a MatMulNBits built from the codes, fed the identity
matrix, must return the solver's matrix bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gptq import assert_pruned_and_generates, awkward_weights, correlated_inputs, upper_inverse

from srcr.base.grids import GRIDS, BlockCodes
from srcr.exporter.pruning.gptq import quantize_columnwise, round_to_nearest

NBITS_GRIDS = [name for name in GRIDS if name.startswith("MatMulNBits")]


def ort_decode(matrix: BlockCodes) -> np.ndarray:
    """[out, in] as ONNX Runtime's MatMulNBits computes it from the written initializers."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from srcr.targets.onnx.matmul_nbits import codes_node
    from srcr.targets.onnx.onnx_edit import GraphEditor, ensure_ms_opset

    rows, columns = matrix.codes.shape
    placeholder = numpy_helper.from_array(np.zeros((columns, rows), dtype=np.float32), "weight")
    matmul = helper.make_node("MatMul", ["x", "weight"], ["y"], name="linear")
    graph = helper.make_graph(
        [matmul],
        "one_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [columns, columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [columns, rows])],
        [placeholder],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    editor = GraphEditor(model)
    editor.replace(matmul, [codes_node(editor, matmul, "weight", matrix)])
    editor.commit()
    ensure_ms_opset(model)
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    identity = np.eye(columns, dtype=np.float32)
    return session.run(None, {"x": identity})[0].T


@pytest.mark.parametrize("name", NBITS_GRIDS)
def test_written_matmul_nbits_decode_to_the_solver_values_bit_for_bit(name):
    weight = awkward_weights(rows=40, columns=224)  # 7 blocks per row: odd, so 4-bit zero points pad
    inputs = correlated_inputs(columns=224)
    rounded = round_to_nearest(weight, GRIDS[name])
    solved, codes, mask = quantize_columnwise(weight, upper_inverse(inputs), GRIDS[name], sparsity=0.5, block_size=32)
    for matrix, values in ((rounded, rounded.dequantize()), (codes, solved)):
        assert np.array_equal(ort_decode(matrix), values.numpy())
    assert np.all(solved.numpy()[mask.numpy()] == 0)  # every MatMulNBits grid holds 0 exactly


def node_decodes(path, weight: str, bits: int) -> np.ndarray:
    """[out, in]: the artifact's own MatMulNBits for `weight`, its initializers as stored (fp16 scales
    through their Cast), run by ONNX Runtime on the identity."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    casts = {node.output[0]: node.input[0] for node in model.graph.node if node.op_type == "Cast"}
    node = next(
        node for node in model.graph.node if node.op_type == "MatMulNBits" and node.input[1] == f"{weight}.q{bits}"
    )
    attrs = {attribute.name: attribute.i for attribute in node.attribute}
    stored = [
        numpy_helper.from_array(
            initializers[casts.get(name, name)].astype(np.float32) if name in casts else initializers[name],
            f"in{index}",
        )
        for index, name in enumerate(node.input[1:], start=1)
    ]
    columns = attrs["K"]
    single = helper.make_node(
        "MatMulNBits", ["x", *(tensor.name for tensor in stored)], ["y"], domain="com.microsoft", **attrs
    )
    graph = helper.make_graph(
        [single],
        "one_node",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [columns, columns])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [columns, attrs["N"]])],
        stored,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=opsets, ir_version=9).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    return session.run(None, {"x": np.eye(columns, dtype=np.float32)})[0].T


@pytest.mark.parametrize(("bits", "symmetric", "sparsity"), [(4, False, 0.5), (4, True, 0.0), (2, False, 0.0)])
def test_onnx_holds_exactly_the_solved_weights_and_runs(tmp_path, smollm_tokenizer, bits, symmetric, sparsity):
    from conftest import make_tiny_llama

    from srcr.exporter.pruning import PruneSpec, prune_model
    from srcr.targets.registry import get_target

    model = make_tiny_llama(smollm_tokenizer)
    target = get_target("onnx")
    spec = target.resolve_quant(bits, None, {"quantizer": "gptq", "symmetric": symmetric or None})
    assert spec.grid == f"MatMulNBits-q{bits}" + ("-sym" if symmetric else "")
    ids = torch.randint(0, 4000, (4, 64), generator=torch.Generator().manual_seed(0))
    report = prune_model(model, ids, PruneSpec("sparsegpt", sparsity, grid=spec.grid))
    out = tmp_path / "model.onnx"
    result = target.export(model, smollm_tokenizer, spec, out, imatrix=report.imatrix, codes=report.codes)
    assert result.quantization["quantizer"] == "gptq"
    assert result.quantization["gptq_tensors"] == 14
    assert result.quantization["ort_tensors"] == ["lm_head.weight"]  # tied: quantized once by wls, shared
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        expected = model.get_parameter(name).detach().numpy()
        assert np.array_equal(node_decodes(out, name, bits), expected), name
    assert_pruned_and_generates(report, sparsity, target, out, ids)
