"""GGUF target: convert with gguf-py, quantize and run with llama.cpp (docs/gguf.md).

The target class lives in `target.py`; this package imports nothing, so the quantizer's child
process (`quantize.py`) starts without loading torch.
"""
