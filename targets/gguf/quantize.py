"""F32/F16 GGUF -> llama.cpp quantization type, with an optional importance matrix.

llama.cpp's own quantizer (`llama_model_quantize`) does the work, so the file gets exactly the
per-tensor type mix llama.cpp's `llama-quantize` would give it; `tensor_type_mix` reads back what
was really written (K-quants fall back to other types on rows that are not multiples of 256).
"""

from __future__ import annotations

import ctypes
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.runtime import available_threads
from srcr.targets.gguf.llama_log import captured_llama_log, failure_reason

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"

# Every file type this llama.cpp build can quantize to, by llama-quantize's name ("Q4_K_M", ...).
QUANT_TYPES: dict[str, int] = {
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    **{
        name.removeprefix(_FTYPE_PREFIX): getattr(llama_cpp, name)
        for name in dir(llama_cpp)
        if name.startswith(_FTYPE_PREFIX)
    },
}

# --bits -> llama.cpp type: the K-quant "medium" mixes where there is one (llama.cpp's recommended
# size/quality trade-off at that width), Q6_K and Q8_0 at the top, and the plain K-quant Q2_K at 2 bits
# because the IQ2 types cannot be made without an importance matrix.
BITS_TO_TYPE: dict[int, str] = {
    2: "Q2_K",
    3: "Q3_K_M",
    4: "Q4_K_M",
    5: "Q5_K_M",
    6: "Q6_K",
    8: "Q8_0",
    16: "F16",
}

# Types whose tensors llama.cpp refuses to quantize without an importance matrix ("the result will
# be garbage"): the 1- to 3-bit IQ grids, and Q2_K inside the Q2_K_S mix.
REQUIRES_IMATRIX = frozenset({"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "Q2_K_S"})


def canonical_quant_type(quant_type: str) -> str:
    name = quant_type.strip().upper()
    if name not in QUANT_TYPES:
        raise SrcrError(f"unknown GGUF quant type {quant_type!r}; valid: {', '.join(sorted(QUANT_TYPES))}")
    return name


def block_width(quant_type: str) -> int:
    """How many consecutive weights of a row the type quantizes together: 256 for K-quants and most IQ
    types (narrower rows fall back to other types), 32 for the legacy types, 1 for floats."""
    if quant_type in ("F32", "F16", "BF16"):
        return 1
    if re.match(r"(?:Q\d_K|IQ[1-3]|IQ4_XS|TQ)", quant_type):
        return 256
    return 32


def nominal_bits(quant_type: str) -> int:
    """The width a type is named after (Q4_K_M -> 4, IQ2_XXS -> 2, BF16 -> 16)."""
    if quant_type in ("F32", "F16", "BF16"):
        return int(quant_type.removeprefix("B").removeprefix("F"))
    match = re.match(r"(?:I?Q|TQ|MXFP|NVFP)(\d)", quant_type)
    if match is None:
        raise ValueError(f"no nominal bit width for {quant_type}")
    return int(match.group(1))


def quantize_gguf(
    src: Path,
    dst: Path,
    quant_type: str,
    imatrix: dict[str, np.ndarray] | None,
    n_threads: int | None = None,
    pure: bool = False,
    keep: Mapping[str, str] | None = None,
) -> None:
    """Quantize GGUF `src` into `dst`; `imatrix` maps GGUF tensor names to per-input-column weights.

    `pure` gives every weight matrix the type itself instead of llama.cpp's per-tensor mix. `keep`
    (GGUF tensor name -> ggml type name) pins tensors to their type whatever the mix says; a tensor
    already of its pinned type is copied unchanged, which is how srcr's GPTQ codes pass through.
    """
    quant_type = canonical_quant_type(quant_type)
    if quant_type in REQUIRES_IMATRIX and not imatrix:
        raise SrcrError(
            f"{quant_type} needs an importance matrix (calibration data); "
            "calibrate the export or choose a K-quant such as Q2_K"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = n_threads or available_threads()
    params.ftype = QUANT_TYPES[quant_type]
    params.pure = pure
    entries = _ImatrixEntries(imatrix) if imatrix else None  # referenced until the call returns
    if entries is not None:
        params.imatrix = entries.array
    overrides = _TypeOverrides(keep) if keep else None  # referenced until the call returns
    if overrides is not None:
        params.tt_overrides = overrides.array
    with captured_llama_log() as log:
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        reason = failure_reason(log, "failed to quantize:")
        raise SrcrError(f"llama.cpp could not quantize to {quant_type}: {reason}")


class _ImatrixEntries:
    """`llama_model_imatrix_data[]` closed by an entry whose name is NULL, plus the buffers it points into.

    llama.cpp copies the values when quantization starts; this object only has to outlive the call.
    """

    def __init__(self, imatrix: dict[str, np.ndarray]) -> None:
        self.names = [name.encode("utf-8") for name in imatrix]
        self.values = [np.ascontiguousarray(values, dtype=np.float32).ravel() for values in imatrix.values()]
        for name, values in zip(imatrix, self.values, strict=True):
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise ValueError(f"imatrix for {name} must be finite and non-negative")
        self.array = (llama_cpp.llama_model_imatrix_data * (len(self.values) + 1))()
        for entry, name, values in zip(self.array, self.names, self.values, strict=False):
            entry.name = name
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size


class _TypeOverrides:
    """`llama_model_tensor_override[]` closed by a NULL pattern: one anchored regex per pinned tensor."""

    def __init__(self, keep: Mapping[str, str]) -> None:
        self.patterns = [f"^{re.escape(name)}$".encode() for name in keep]
        self.array = (llama_cpp.llama_model_tensor_override * (len(keep) + 1))()
        for entry, pattern, type_name in zip(self.array, self.patterns, keep.values(), strict=False):
            entry.pattern = pattern
            entry.type = int(gguf.GGMLQuantizationType[type_name])


def tensor_type_mix(source: Path | gguf.GGUFReader) -> dict[str, Any]:
    """Tensor types of the weight matrices in a GGUF (a path, or a reader already open on it), and their
    storage in bits per weight."""
    reader = source if isinstance(source, gguf.GGUFReader) else gguf.GGUFReader(source)
    weights = [tensor for tensor in reader.tensors if len(tensor.shape) >= 2]
    types = Counter(tensor.tensor_type.name for tensor in weights)
    n_weights = sum(int(tensor.n_elements) for tensor in weights)
    n_bytes = sum(int(tensor.n_bytes) for tensor in weights)
    return {
        "types": dict(types.most_common()),
        "bits_per_weight": 8 * n_bytes / n_weights if n_weights else 0.0,
        "n_weights": n_weights,
    }
