"""A GGUF file for a byte budget: a llama.cpp type per weight matrix, chosen from measured sensitivities.

Every weight matrix of the unrounded file may be stored in any type llama.cpp writes for its row width
without falling back (the K and IQ types of 256-weight super-blocks, the legacy and IQ4_NL types of
32-weight blocks, Q8_0). Each candidate is scored by the relative error of exactly the values llama.cpp
would store (targets/gguf/roundtrip.py, with the importance matrix llama-quantize gets) times the
tensor's KL curve (exporter/sensitivity.py), and srcr.base.allocation picks the mix that fits.
The file is then written by llama.cpp's quantizer with one tensor-type override per matrix.

With srcr's GPTQ as a second quantizer (--quantizer auto, `GgufGptq`) every decoder matrix is scored in
the Gram metric of its calibration inputs (srcr.base.gram: GPTQ's gain is invisible to the importance
matrix's), llama.cpp's types and GPTQ's alike. GPTQ is offered only at the types within one step, on
the matrix's own Pareto frontier, of what it would get from llama.cpp's types alone: GPTQ takes about a
second per matrix and type on a CPU, and a quantizer that rounds better moves a matrix a type or so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import gguf
import numpy as np

from srcr.base.allocation import (
    Allocation,
    KlCurve,
    Option,
    WholeModelCheck,
    allocate_file,
    frontier,
)
from srcr.base.errors import SrcrError
from srcr.base.gram import output_error
from srcr.base.grids import GRIDS
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
# An allocation's label for a matrix srcr's GPTQ rounds: the ggml type, then this ("Q4_K+gptq").
GPTQ_SUFFIX = "+gptq"


def ggml_type(label: str) -> str:
    """The ggml type an allocation's label stores a matrix in, whoever rounds it."""
    return label.removesuffix(GPTQ_SUFFIX)


def by_gptq(label: str) -> bool:
    return label.endswith(GPTQ_SUFFIX)


@dataclass(frozen=True)
class GgufGptq:
    """srcr's GPTQ for the matrices of one file, by GGUF name (the target maps Hugging Face names).

    `gram`: the Gram matrix of each decoder matrix's calibration inputs (columns are never permuted by a
    converter, so it holds for the file's rows too); `error(name, type)`: the Gram-metric relative
    error of GPTQ's codes of that matrix on that type's grid."""

    gram: Mapping[str, np.ndarray]
    error: Callable[[str, str], float]


def gptq_writes(type_name: str, columns: int) -> bool:
    """Whether srcr's GPTQ writes rows of `columns` weights in this ggml type exactly."""
    return type_name in GRIDS and type_name in CANDIDATES and columns % GRIDS[type_name].span == 0


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
    weight: np.ndarray,
    importance: np.ndarray | None,
    curve: KlCurve,
    candidates: tuple[str, ...] = CANDIDATES,
    gram: np.ndarray | None = None,
) -> list[Option]:
    """Every type llama.cpp can write this matrix in, with its bytes and predicted KL (the error in the
    Gram metric when `gram` is given: `curve` must have been measured in it)."""
    rows, columns = weight.shape
    options = []
    for type_name in candidates:
        if not writable(type_name, columns, importance is not None):
            continue
        error = output_error(weight, roundtrip(weight, type_name, importance), importance, gram)
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
    gptq: GgufGptq | None = None,
) -> Allocation:
    """The type of every weight matrix of the unrounded file behind `reader` so that the quantized file
    fits `budget_bytes`. `sensitivity` and `imatrix` are keyed by GGUF tensor name; with `check` (by GGUF
    name too), the additive choice and its alternatives are measured on the whole model, the best kept.
    With `gptq`, srcr's GPTQ competes with llama.cpp's quantizer matrix by matrix (labels `GPTQ_SUFFIX`)."""
    matrices = weight_matrices(reader)
    available = tensor_budget(reader, file_bytes, budget_bytes)
    grams = gptq.gram if gptq is not None else {}
    options: dict[str, list[Option]] = {}
    pinned: dict[str, Option] = {}
    for done, tensor in enumerate(matrices):
        weight = float_weights(tensor)
        if tensor.name in sensitivity:
            options[tensor.name] = tensor_options(
                weight, imatrix.get(tensor.name), sensitivity[tensor.name], gram=grams.get(tensor.name)
            )
        else:
            rows, columns = weight.shape
            pinned[tensor.name] = Option(UNMEASURED_TYPE, tensor_bytes(UNMEASURED_TYPE, rows, columns), 0.0)
        progress(f"score types {done + 1}/{len(matrices)}", done + 1, len(matrices))
    if gptq is not None:
        first = allocate_file(options, pinned, budget_bytes, available, "GGUF")
        shapes = {tensor.name: (int(np.prod(tensor.shape[1:])), int(tensor.shape[0])) for tensor in matrices}
        _add_gptq_options(options, first.types, shapes, sensitivity, gptq, progress)
    return allocate_file(options, pinned, budget_bytes, available, "GGUF", check, progress)


def _add_gptq_options(
    options: dict[str, list[Option]],
    first: Mapping[str, str],
    shapes: Mapping[str, tuple[int, int]],
    curves: Mapping[str, KlCurve],
    gptq: GgufGptq,
    progress: ProgressFn,
) -> None:
    """GPTQ's options for every matrix with a Gram matrix, at the types within one frontier step of its
    first choice (`first`, from llama.cpp's types alone), in place."""
    names = [name for name in options if name in gptq.gram]
    for done, name in enumerate(names):
        rows, columns = shapes[name]
        chosen = next(option for option in options[name] if option.label == first[name])
        low, high = near_bytes(options[name], chosen)
        for type_name in CANDIDATES:
            size = tensor_bytes(type_name, rows, columns) if gptq_writes(type_name, columns) else -1
            if low <= size <= high:
                cost = curves[name](gptq.error(name, type_name))
                options[name].append(Option(type_name + GPTQ_SUFFIX, size, cost))
        progress(f"GPTQ candidates {done + 1}/{len(names)}", done + 1, len(names))


def near_bytes(options: list[Option], chosen: Option) -> tuple[int, int]:
    """The bytes of the frontier options one step below and one above `chosen` (its own where none is)."""
    steps = frontier(options)
    below = [option.bytes for option in steps if option.bytes < chosen.bytes]
    above = [option.bytes for option in steps if option.bytes > chosen.bytes]
    return (below[-1] if below else chosen.bytes), (above[0] if above else chosen.bytes)


def budget_from_bpw(reader: gguf.GGUFReader, file_bytes: int, bits_per_weight: float) -> int:
    """The whole-file budget that gives the weight matrices `bits_per_weight` on average (srcr's measure of
    bits per weight: storage of the 2-D tensors over their weights)."""
    n_weights = sum(int(tensor.n_elements) for tensor in weight_matrices(reader))
    return int(bits_per_weight * n_weights / 8) + _fixed_bytes(reader, file_bytes)
