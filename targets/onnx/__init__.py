"""ONNX target: a KV-cache decoder graph, weight-only MatMulNBits blocks, ONNX Runtime (docs/onnx.md).

The target class lives in `target.py`.
"""
