"""A GGUF file for a byte budget: a llama.cpp type per weight matrix, chosen from measured sensitivities.

Every weight matrix of the unrounded file may be stored in any type llama.cpp writes for its row width
without falling back (the K and IQ types of 256-weight super-blocks, the legacy and IQ4_NL types of
32-weight blocks, Q8_0). Each candidate is scored by the relative error of exactly the values llama.cpp
would store (targets/gguf/roundtrip.py, with the importance matrix llama-quantize gets) times the
tensor's KL curve (exporter/sensitivity.py), and srcr.base.allocation picks the mix that fits.
The file is then written by llama.cpp's quantizer with one tensor-type override per matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import gguf
import numpy as np

from srcr.base.allocation import Allocation, KlCurve, Option, WholeModelCheck, allocate_file, relative_error
from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress
from srcr.targets.gguf.roundtrip import roundtrip, tensor_bytes, writable

# The types the allocator may give a matrix, from fewest bits to most. IQ2 and IQ1 are left out: minutes
# to quantize per model, and below what a budget for a whole-model preset of 3 bits or more would use.
CANDIDATES = ("Q2_K", "Q3_K", "IQ3_S", "Q4_0", "IQ4_NL", "IQ4_XS", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
              "Q6_K", "Q8_0")  # fmt: skip
# A matrix srcr has no sensitivity for (a family llama.cpp's converter fused or reshaped) is pinned to this.
UNMEASURED_TYPE = "Q8_0"
# GGUF aligns every tensor's data to 32 bytes: up to 31 bytes of padding each.
ALIGNMENT = 32


def float_weights(tensor: gguf.ReaderTensor) -> np.ndarray:
    """An unrounded tensor of a GGUF as float32 [rows, columns]."""
    kind = tensor.tensor_type
    rows, columns = int(np.prod(tensor.shape[1:])), int(tensor.shape[0])
    raw = np.asarray(tensor.data)
    if kind == gguf.GGMLQuantizationType.F32:
        values = raw.astype(np.float32, copy=False)
    elif kind == gguf.GGMLQuantizationType.F16:
        values = raw.view(np.float16).astype(np.float32)
    elif kind == gguf.GGMLQuantizationType.BF16:
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        raise SrcrError(f"{tensor.name} is {kind.name} already; the budget allocator reads an unrounded file")
    return values.reshape(rows, columns)


def weight_matrices(reader: gguf.GGUFReader) -> list[gguf.ReaderTensor]:
    return [tensor for tensor in reader.tensors if len(tensor.shape) >= 2]


def tensor_options(
    weight: np.ndarray, importance: np.ndarray | None, curve: KlCurve, candidates: tuple[str, ...] = CANDIDATES
) -> list[Option]:
    """Every type llama.cpp can write this matrix in, with its bytes and predicted KL."""
    rows, columns = weight.shape
    options = []
    for type_name in candidates:
        if not writable(type_name, columns, importance is not None):
            continue
        error = relative_error(weight, roundtrip(weight, type_name, importance), importance)
        options.append(Option(type_name, tensor_bytes(type_name, rows, columns), curve(error)))
    if not options:
        raise SrcrError(f"llama.cpp writes no quantized type for rows of {columns} weights; use --quant-type F16")
    return options


def smallest_bytes(rows: int, columns: int, has_imatrix: bool = True) -> int:
    """The fewest bytes any candidate type stores a rows x columns matrix in."""
    sizes = [tensor_bytes(t, rows, columns) for t in CANDIDATES if writable(t, columns, has_imatrix)]
    if not sizes:
        raise SrcrError(f"llama.cpp writes no quantized type for rows of {columns} weights; use --quant-type F16")
    return min(sizes)


def _fixed_bytes(reader: gguf.GGUFReader, file_bytes: int) -> int:
    """Everything but the weight matrices' data (header, vocabulary, 1-D tensors, as in the unrounded file),
    plus the worst-case alignment padding of the matrices."""
    matrices = weight_matrices(reader)
    return file_bytes - sum(int(tensor.n_bytes) for tensor in matrices) + ALIGNMENT * len(matrices)


def tensor_budget(reader: gguf.GGUFReader, file_bytes: int, budget_bytes: int) -> int:
    """The bytes the weight matrices may take within `budget_bytes` for the whole file."""
    return budget_bytes - _fixed_bytes(reader, file_bytes)


def allocate_types(
    reader: gguf.GGUFReader,
    file_bytes: int,
    budget_bytes: int,
    sensitivity: Mapping[str, KlCurve],
    imatrix: Mapping[str, np.ndarray],
    progress: ProgressFn = no_progress,
    check: WholeModelCheck | None = None,
) -> Allocation:
    """The type of every weight matrix of the unrounded file behind `reader` so that the quantized file
    fits `budget_bytes`. `sensitivity` and `imatrix` are keyed by GGUF tensor name; with `check` (by GGUF
    name too), the additive choice and its alternatives are measured on the whole model, the best kept."""
    matrices = weight_matrices(reader)
    available = tensor_budget(reader, file_bytes, budget_bytes)
    options: dict[str, list[Option]] = {}
    pinned: dict[str, Option] = {}
    for done, tensor in enumerate(matrices):
        weight = float_weights(tensor)
        if tensor.name in sensitivity:
            options[tensor.name] = tensor_options(weight, imatrix.get(tensor.name), sensitivity[tensor.name])
        else:
            rows, columns = weight.shape
            pinned[tensor.name] = Option(UNMEASURED_TYPE, tensor_bytes(UNMEASURED_TYPE, rows, columns), 0.0)
        progress(f"score types {done + 1}/{len(matrices)}", done + 1, len(matrices))
    return allocate_file(options, pinned, budget_bytes, available, "GGUF", check, progress)


def budget_from_bpw(reader: gguf.GGUFReader, file_bytes: int, bits_per_weight: float) -> int:
    """The whole-file budget that gives the weight matrices `bits_per_weight` on average (srcr's measure of
    bits per weight: storage of the 2-D tensors over their weights)."""
    n_weights = sum(int(tensor.n_elements) for tensor in weight_matrices(reader))
    return int(bits_per_weight * n_weights / 8) + _fixed_bytes(reader, file_bytes)
