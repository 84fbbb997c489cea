"""A weight matrix through llama.cpp's own quantizer and back, for any ggml type it writes.

The budget allocator scores every candidate type of every tensor by the error of exactly the values
llama.cpp would store, so it calls ggml's `ggml_quantize_chunk` (with the same importance matrix
llama-quantize gets) and the type's `dequantize_row_*`, from the libggml-base that llama-cpp-python ships.
"""

from __future__ import annotations

import ctypes
import functools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import llama_cpp
import numpy as np

from srcr.base.runtime import available_threads

# Types that quantize a tensor without an importance matrix only "into garbage": ggml aborts the process.
_NEEDS_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS"})
_FLOATS = frozenset({"F32", "F16", "BF16"})


@functools.cache
def _library() -> ctypes.CDLL:
    library = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    library.ggml_quantize_chunk.restype = ctypes.c_size_t
    library.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p
    ]  # fmt: skip
    return library


def _dequantizer(type_name: str):  # noqa: ANN202 - a ctypes function
    function = getattr(_library(), f"dequantize_row_{type_name.lower().replace('_k', '_K')}")
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    function.restype = None
    return function


def block_shape(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def tensor_bytes(type_name: str, rows: int, columns: int) -> int:
    """Bytes a rows x columns matrix takes in `type_name` (without the file's 32-byte alignment)."""
    weights, size = block_shape(type_name)
    if columns % weights:
        raise ValueError(f"{type_name} quantizes rows of a multiple of {weights} weights, not {columns}")
    return rows * (columns // weights) * size


def writable(type_name: str, columns: int, has_imatrix: bool) -> bool:
    """Whether llama.cpp can store rows of `columns` weights in `type_name` as asked (no fallback)."""
    return columns % block_shape(type_name)[0] == 0 and (has_imatrix or type_name not in _NEEDS_IMATRIX)


def roundtrip(
    weight: np.ndarray, type_name: str, imatrix: np.ndarray | None, n_threads: int | None = None
) -> np.ndarray:
    """The float32 values llama.cpp stores for `weight` [rows, columns] in `type_name`.

    Rows are split across threads (ggml quantizes whole rows independently; ctypes releases the GIL).
    """
    source = np.ascontiguousarray(weight, dtype=np.float32)
    rows, columns = source.shape
    if type_name == "F32":
        return source.copy()
    if type_name in _FLOATS:
        return _float_roundtrip(source, type_name)
    if not writable(type_name, columns, imatrix is not None):
        raise ValueError(f"llama.cpp cannot write a {rows}x{columns} matrix as {type_name} here")
    weights, size = block_shape(type_name)
    row_bytes = columns // weights * size
    packed = np.empty(rows * row_bytes, dtype=np.uint8)
    importance = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32).ravel()
    if importance is not None and importance.size != columns:
        raise ValueError(f"imatrix has {importance.size} entries for {columns} columns")
    type_id = int(gguf.GGMLQuantizationType[type_name])
    library = _library()
    # One row first, alone: ggml initializes the IQ types' grids on first use, and not thread-safely.
    library.ggml_quantize_chunk(type_id, source.ctypes.data, packed.ctypes.data, 0, 1, columns,
                                None if importance is None else importance.ctypes.data)  # fmt: skip

    def quantize(span: tuple[int, int]) -> None:
        start, stop = span
        library.ggml_quantize_chunk(
            type_id,
            source.ctypes.data,
            packed.ctypes.data,
            start * columns,
            stop - start,
            columns,
            None if importance is None else importance.ctypes.data,
        )

    threads = max(1, min(n_threads or available_threads(), rows))
    bounds = np.linspace(0, rows, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(quantize, zip(bounds[:-1], bounds[1:], strict=True)))
    out = np.empty(rows * columns, dtype=np.float32)
    _dequantizer(type_name)(packed.ctypes.data, out.ctypes.data, rows * columns)
    return out.reshape(rows, columns)


def _float_roundtrip(source: np.ndarray, type_name: str) -> np.ndarray:
    if type_name == "F16":
        return source.astype(np.float16).astype(np.float32)
    # bfloat16 as llama.cpp rounds it: to nearest even on the upper 16 bits.
    bits = source.view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)
