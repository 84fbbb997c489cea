"""The GGUF target: convert with gguf-py, quantize and run with llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import llama_cpp
import numpy as np

from srcr.base.allocation import KlCurve, WholeModelCheck, WholeModelKl
from srcr.base.child import run_in_child
from srcr.base.errors import SrcrError
from srcr.base.files import temp_name
from srcr.base.gram import GptqSolver, gram_error
from srcr.base.grids import BlockCodes
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.weights import SafetensorsFolder, TensorSource
from srcr.targets.base import (
    BUDGET_CHECK,
    BUDGET_OPTIONS,
    DEFAULT_BITS,
    PER_TENSOR_GPTQ,
    BudgetRequest,
    ExportResult,
    Imatrix,
    QuantSpec,
    budget_request,
    check_budget_check,
    check_budget_floor,
)
from srcr.targets.gguf.blocks import GGML_TYPES
from srcr.targets.gguf.budget import (
    Allocation,
    GgufGptq,
    allocate_types,
    budget_from_bpw,
    by_gptq,
    ggml_type,
    smallest_bytes,
)
from srcr.targets.gguf.convert import SUPPORTED_ARCHITECTURES, architecture_spec, convert_to_gguf, rope_parameters
from srcr.targets.gguf.fidelity import SKIP_CHECK_VARIABLE, check_reproduces
from srcr.targets.gguf.llama_log import check_vocab_loads
from srcr.targets.gguf.quantize import (
    BITS_TO_TYPE,
    block_width,
    canonical_quant_type,
    nominal_bits,
    quantize_gguf,
    tensor_type_mix,
)
from srcr.targets.gguf.roundtrip import roundtrip
from srcr.targets.gguf.runtime import LlamaCppRuntime, gpu_layers_for
from srcr.targets.gguf.upstream import check_supported, check_vocab, convert_with_llama_cpp, locate_converter

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# Options resolve_quant accepts; `pure` turns off llama.cpp's per-tensor K-quant mix, `quantizer` picks
# who rounds the decoder's weight matrices: llama.cpp (default), srcr's GPTQ, or (within a budget) the
# better of the two per matrix.
_OPTIONS = ("pure", "quantizer", *BUDGET_OPTIONS, BUDGET_CHECK)
UNQUANTIZED = ("F32", "F16", "BF16")
AUTO = PER_TENSOR_GPTQ
QUANTIZERS = ("llama.cpp", "gptq", AUTO)
# --bits -> the type srcr's GPTQ writes: the legacy block types, whose 32-weight blocks fit any row of a
# multiple of 32; the K-quants (256-weight super-blocks) at 2, 3 and 6 bits. Q4_K and Q5_K by --quant-type.
GPTQ_BITS_TO_TYPE = {2: "Q2_K", 3: "Q3_K", 4: "Q4_0", 5: "Q5_0", 6: "Q6_K", 8: "Q8_0"}
# The llama.cpp file type that picks the types of the tensors GPTQ does not write (token embeddings,
# output head): the K-quant "medium" mix for a K grid, the type itself otherwise.
GPTQ_LLAMA_CPP_FTYPE = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}


class GGUFTarget:
    name = "gguf"
    suffix = ".gguf"
    streams = True

    def resolve_quant(self, bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
        check_budget_check(options)
        # Unset options, and --no-budget-check (the default), are left out.
        options = {key: value for key, value in options.items() if value is not None and (key != BUDGET_CHECK or value)}
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            flags = ", ".join(f"--{key.replace('_', '-')}" for key in unknown)
            raise SrcrError(
                f"{flags} do not apply to --format gguf (its options: --pure, --quantizer, --budget-mb, "
                "--budget-bpw); drop them"
            )
        quantizer = str(options.get("quantizer", "llama.cpp"))
        if quantizer not in QUANTIZERS:
            raise SrcrError(f"unknown --quantizer {quantizer!r} for GGUF; choose {' or '.join(QUANTIZERS)}")
        if any(key in options for key in BUDGET_OPTIONS):
            return _resolve_budget(bits, quant_type, options)
        if quantizer == AUTO:
            raise SrcrError(
                "--quantizer auto picks llama.cpp's or srcr's GPTQ per matrix within a budget; add --budget-mb "
                "or --budget-bpw, or choose --quantizer llama.cpp or gptq"
            )
        if quantizer == "gptq":
            return _resolve_gptq(bits, quant_type, options)
        if quant_type is not None:
            name = canonical_quant_type(quant_type)
            if bits is not None and bits != nominal_bits(name):
                raise SrcrError(
                    f"--bits {bits} contradicts --quant-type {name} ({nominal_bits(name)}-bit); pass only one"
                )
        else:
            bits = DEFAULT_BITS if bits is None else bits
            if bits not in BITS_TO_TYPE:
                raise SrcrError(
                    f"GGUF supports --bits {', '.join(map(str, BITS_TO_TYPE))}, not {bits}; "
                    "or name a llama.cpp type with --quant-type"
                )
            name = BITS_TO_TYPE[bits]
        return QuantSpec(format=self.name, bits=nominal_bits(name), quant_type=name, options=options)

    def check_structure(self, config: PretrainedConfig, drops_layers: bool, per_layer_widths: bool) -> None:
        model_type = getattr(config, "model_type", None)
        # Per-layer widths are written as llama.cpp's `deci` architecture: Llama with per-layer widths.
        deci = writes_itself(config) and architecture_spec(config).gguf_arch == gguf.MODEL_ARCH.LLAMA
        if per_layer_widths and not deci:
            raise SrcrError(
                f"--width-allocation global gives every layer its own widths, which the gguf target cannot write "
                f"for {model_type}; use --width-allocation uniform"
            )
        if drops_layers and not writes_itself(config) and len(set(getattr(config, "layer_types", None) or [])) > 1:
            raise SrcrError(
                f"llama.cpp places {model_type}'s sliding-window layers by position, so after --drop-layers kept "
                "layers would run with another layer's attention; drop --drop-layers or use --format onnx"
            )

    def width_multiple(self, spec: QuantSpec) -> int:
        return 32 if spec.allocates else block_width(spec.quant_type)

    def check_model(self, config: PretrainedConfig, spec: QuantSpec) -> None:
        if writes_itself(config):
            architecture_spec(config)
            rope_parameters(config)
            return
        model_type = getattr(config, "model_type", None)
        if spec.grid is not None or spec.per_tensor_gptq:
            raise SrcrError(
                f"--quantizer {spec.options.get('quantizer')} writes GGUF through srcr's own writer "
                f"({', '.join(SUPPORTED_ARCHITECTURES)}); {model_type} goes through llama.cpp's converter: use "
                "--quantizer llama.cpp"
            )
        architecture = (getattr(config, "architectures", None) or [None])[0]
        if architecture is None:
            raise SrcrError(f"the config of this {model_type} model names no `architectures`; add it to config.json")
        check_supported(locate_converter(), architecture, str(model_type))

    def check_budget(self, shapes: list[tuple[int, int]], spec: QuantSpec) -> None:
        check_budget_floor(
            spec, shapes, smallest_bytes, "GGUF", "the smallest types llama.cpp writes", "the smallest types"
        )

    def check_files(self, folder: Path, config: PretrainedConfig) -> None:
        if not writes_itself(config):
            check_vocab(locate_converter(), folder, Path(folder).name)

    def export(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: QuantSpec,
        out: Path,
        imatrix: Imatrix | None = None,
        hints: Mapping[str, object] | None = None,
        progress: ProgressFn = no_progress,
        codes: Mapping[str, BlockCodes] | None = None,
        weights: TensorSource | None = None,
        sensitivity: Mapping[str, KlCurve] | None = None,
        whole_model_kl: WholeModelKl | None = None,
        gptq: GptqSolver | None = None,
    ) -> ExportResult:
        out = Path(out)
        if spec.allocates and not sensitivity:
            raise SrcrError("a --budget export needs the sensitivities measured on the calibration data; none came")
        if spec.per_tensor_gptq and gptq is None:
            raise SrcrError("--quantizer auto needs the calibration inputs' statistics for GPTQ; none came")
        codes = dict(codes or {})
        if spec.grid is not None and not codes:
            raise SrcrError(f"{spec.quant_type} with --quantizer gptq needs the calibration pass's codes; none came")
        if codes and any(matrix.grid != spec.quant_type for matrix in codes.values()):
            raise SrcrError(f"the GPTQ codes are not on the {spec.quant_type} grid this export writes")
        unquantized = spec.quant_type in UNQUANTIZED
        steps = 2 if unquantized else 3
        progress("convert to GGUF", 0, steps)
        stage_seconds: dict[str, float] = {}
        started = time.perf_counter()
        conversion_kl = None
        allocation = None
        if unquantized:
            _, converter = convert(model, tokenizer, out, spec.quant_type, hints, weights=weights)
            _check_loads(out)
            if spec.quant_type == lossless_type(model):
                conversion_kl = _check_fidelity(model, tokenizer, out, codes, weights)
            gguf_imatrix: dict = {}
            keep: dict[str, str] = {}
        else:
            # The full-precision intermediate lies beside the artifact under a temporary name of its own,
            # in the checkpoint's dtype: exact, and half the size of F32 for a 16-bit checkpoint.
            full_precision = out.parent / temp_name(f"{out.name}.full")
            try:
                intermediate = lossless_type(model)
                names, converter = convert(model, tokenizer, full_precision, intermediate, hints, codes, weights)
                _check_loads(full_precision)
                conversion_kl = _check_fidelity(model, tokenizer, full_precision, codes, weights)
                # With GPTQ codes the importance matrix is left out: it covers only the decoder's matrices,
                # which are quantized already and pinned to their type (`keep`). llama.cpp's converter may
                # fuse or reshape some matrices; only those it wrote as they were carry their importance.
                usable = dict(imatrix or {})
                if converter != SRCR_WRITER:
                    usable = {name: values for name, values in usable.items() if name in names}
                gguf_imatrix = {} if codes else imatrix_by_gguf_name(usable, names)
                keep = {names[name]: matrix.grid for name, matrix in codes.items()}
                ftype = GPTQ_LLAMA_CPP_FTYPE.get(spec.quant_type, spec.quant_type) if codes else spec.quant_type
                pure = bool(spec.options.get("pure", False))
                stage_seconds["convert"] = time.perf_counter() - started
                started = time.perf_counter()
                if spec.allocates:
                    progress("choose a type per tensor", 1, steps)
                    solver = gptq if spec.per_tensor_gptq else None
                    matrices = _Matrices.of(model, names)
                    check = _whole_model_check(matrices, gguf_imatrix, whole_model_kl, solver)
                    by_gguf = _gguf_gptq(matrices, solver) if solver is not None else None
                    allocation = _allocate(
                        full_precision, spec, sensitivity or {}, names, gguf_imatrix, progress, check, by_gguf
                    )
                    keep, ftype, pure = written_types(allocation), BUDGET_BASE_TYPE, True
                    stage_seconds["allocate"] = time.perf_counter() - started
                    started = time.perf_counter()
                    if solver is not None and any(by_gptq(label) for label in allocation.types.values()):
                        progress("write the GPTQ matrices", 1, steps)
                        codes = _chosen_codes(allocation, matrices, solver)
                        convert(model, tokenizer, full_precision, intermediate, hints, codes, weights)
                        stage_seconds["gptq"] = time.perf_counter() - started
                        started = time.perf_counter()
                progress(f"quantize to {spec.quant_type}", 1, steps)
                # In a child process: Ctrl-C stops it at once, and a crash in llama.cpp stays one line.
                run_in_child(
                    f"llama.cpp's quantizer ({spec.quant_type})",
                    quantize_gguf,
                    full_precision,
                    out,
                    ftype,
                    gguf_imatrix or None,
                    None,
                    pure,
                    keep,
                )
            finally:
                full_precision.unlink(missing_ok=True)
        progress("measure", steps - 1, steps)
        reader = gguf.GGUFReader(out)  # parsing the header takes seconds on a real vocabulary: once
        if allocation is not None:
            check_written_as_allocated(reader, allocation, out.stat().st_size)
            written = {}
        else:
            written = check_written_as_solved(reader, keep)
        mix = tensor_type_mix(reader)
        stage_seconds["convert" if unquantized else "quantize"] = time.perf_counter() - started
        result = ExportResult(
            artifact=out,
            artifact_bytes=out.stat().st_size,
            bits_per_weight=mix["bits_per_weight"],
            quantization={
                "llama_cpp_type": spec.quant_type,
                "type_mix": mix["types"],
                "imatrix": bool(gguf_imatrix),
                "imatrix_entries": len(gguf_imatrix),
                "pure": bool(spec.options.get("pure", False)),
                "quantizer": AUTO if spec.per_tensor_gptq else "gptq" if codes else "llama.cpp",
                # With GPTQ: the weight matrices llama.cpp still quantized itself (embeddings, output head).
                "llama_cpp_tensors": written,
                "gptq_tensors": len(codes),
                # --budget-mb / --budget-bpw: the type srcr chose for every weight matrix, and why.
                **({"allocation": allocation.manifest_section()} if allocation is not None else {}),
            },
            format_info={
                "gguf_version": gguf.GGUF_VERSION,
                "llama_cpp_python": llama_cpp.__version__,
                "gguf_py": importlib.metadata.version("gguf"),
                "converter": converter,
                # Mean KL(PyTorch || llama.cpp) on the unrounded file; None where it was not checked.
                "conversion_kl": conversion_kl,
            },
            stage_seconds={name: round(seconds, 3) for name, seconds in stage_seconds.items()},
        )
        progress("measure", steps, steps)
        return result

    def open_runtime(self, artifact: Path, device: str = "auto") -> LlamaCppRuntime:
        return LlamaCppRuntime(Path(artifact), n_gpu_layers=gpu_layers_for(device))

    def for_checkpoint(self, spec: QuantSpec, dtype: str) -> QuantSpec:
        """--bits 16 of a bfloat16 checkpoint is BF16: F16 would round its weights a second time."""
        if spec.quant_type == "F16" and spec.grid is None and dtype == "bfloat16":
            return dataclasses.replace(spec, quant_type="BF16")
        return spec

    def reference_spec(self, dtype: str) -> QuantSpec:
        """The file the reference runs on when the model is not held in memory: the checkpoint, unrounded."""
        return QuantSpec(format=self.name, bits=16, quant_type=_LOSSLESS.get(dtype, "F32"), options={})


# The file type llama.cpp is asked for when srcr pins every matrix's type: only 1-D tensors and matrices
# without an override would take it, and with `pure` nothing overrides srcr's choice.
BUDGET_BASE_TYPE = "Q8_0"
# Average bits per weight a budget may ask for: about Q2_K .. Q8_0 over the weight matrices.
BUDGET_BPW_RANGE = (2.0, 8.5)


def _resolve_budget(bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
    request = budget_request(bits, quant_type, options, BUDGET_BPW_RANGE, "llama.cpp's types")
    quantizer = str(options.get("quantizer", "llama.cpp"))
    if quantizer not in ("llama.cpp", AUTO) or options.get("pure"):
        raise SrcrError(
            "--budget-mb / --budget-bpw choose a type per tensor, rounded by llama.cpp (or, with --quantizer auto, "
            "by llama.cpp or srcr's GPTQ per tensor); drop --pure, use --quantizer llama.cpp or auto"
        )
    spec_options = {"quantizer": quantizer, **request.spec_options()}
    return QuantSpec(format="gguf", bits=request.nominal_bits, quant_type=request.quant_type, options=spec_options)


def _allocate(
    full_precision: Path,
    spec: QuantSpec,
    sensitivity: Mapping[str, KlCurve],
    names: Mapping[str, str],
    imatrix: Mapping[str, np.ndarray],
    progress: ProgressFn,
    check: WholeModelCheck | None,
    gptq: GgufGptq | None = None,
) -> Allocation:
    reader = gguf.GGUFReader(full_precision)
    file_bytes = full_precision.stat().st_size
    request = BudgetRequest.of(spec)
    if request.key == "budget_bpw":
        budget = budget_from_bpw(reader, file_bytes, request.value)
    else:
        budget = int(request.value * 1e6)
    by_gguf_name = {names[name]: value for name, value in sensitivity.items() if name in names}
    return allocate_types(reader, file_bytes, budget, by_gguf_name, imatrix, progress, check, gptq)


def written_types(allocation: Allocation) -> dict[str, str]:
    """GGUF name -> the ggml type the file stores each matrix in, whoever rounds it."""
    return {name: ggml_type(label) for name, label in allocation.types.items()}


@dataclasses.dataclass(frozen=True)
class _Matrices:
    """The Hugging Face weight matrices by the GGUF names the converter gave them (`names`: Hugging Face
    name -> GGUF name), for the allocation's measurements."""

    hugging_face: Mapping[str, str]
    parameters: Mapping[str, torch.nn.Parameter]

    @classmethod
    def of(cls, model: PreTrainedModel, names: Mapping[str, str]) -> _Matrices:
        hugging_face = {gguf_name: name for name, gguf_name in names.items()}
        return cls(hugging_face, dict(model.named_parameters(remove_duplicate=False)))

    def source(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF matrix written as it was (None: fused, reshaped or not a matrix)."""
        source = self.hugging_face.get(gguf_name)
        if source not in self.parameters or self.parameters[source].dim() != 2:
            return None
        return source

    def weight(self, gguf_name: str) -> np.ndarray:
        return self.parameters[self.hugging_face[gguf_name]].detach().float().cpu().numpy()


def _gguf_gptq(matrices: _Matrices, solver: GptqSolver) -> GgufGptq:
    """The solver by GGUF name. Errors are taken on the Hugging Face rows: the Gram metric sums over rows,
    so a converter's row permutation (Q and K) does not change them."""
    grams = {
        gguf_name: gram for gguf_name, name in matrices.hugging_face.items() if (gram := solver.gram(name)) is not None
    }
    last: dict[str, np.ndarray] = {}  # candidates come a matrix at a time: its weight converted once

    def error(name: str, type_name: str) -> float:
        if name not in last:
            last.clear()
            last[name] = matrices.weight(name)
        solved = solver.solve(matrices.hugging_face[name], type_name).dequantize().numpy()
        return gram_error(last[name], solved, grams[name])

    return GgufGptq(gram=grams, error=error)


def _chosen_codes(allocation: Allocation, matrices: _Matrices, solver: GptqSolver) -> dict[str, BlockCodes]:
    """The GPTQ codes of the matrices the allocation gave to GPTQ, by Hugging Face name (solved again:
    holding every candidate's codes would take two bytes a weight per type)."""
    return {
        matrices.hugging_face[name]: solver.solve(matrices.hugging_face[name], ggml_type(label))
        for name, label in allocation.types.items()
        if by_gptq(label)
    }


def _whole_model_check(
    matrices: _Matrices,
    imatrix: Mapping[str, np.ndarray],
    whole_model_kl: WholeModelKl | None,
    gptq: GptqSolver | None = None,
) -> WholeModelCheck | None:
    """Candidate allocations measured in PyTorch by GGUF name. ggml quantizes every row on its own, so
    llama.cpp's values for the Hugging Face matrix are its values for the converter's (whose Q and K rows
    may be permuted) in Hugging Face's row order; matrices the converter fused stay unrounded there."""
    if whole_model_kl is None:
        return None
    measure = whole_model_kl

    def approximate(name: str, label: str) -> np.ndarray | None:
        source = matrices.source(name)
        if source is None:
            return None
        if gptq is not None and by_gptq(label):
            return gptq.solve(source, ggml_type(label)).dequantize().numpy()
        return roundtrip(matrices.weight(name), label, imatrix.get(name))

    return WholeModelCheck(
        approximate, lambda replaced: measure({matrices.hugging_face[n]: v for n, v in replaced.items()})
    )


def check_written_as_allocated(reader: gguf.GGUFReader, allocation: Allocation, file_bytes: int) -> None:
    """llama.cpp wrote every matrix in the type srcr chose, and the file fits the budget."""
    types = written_types(allocation)
    changed = not_written_as_pinned(reader, types)
    if changed:
        name, written = next(iter(changed.items()))
        raise SrcrError(
            f"llama.cpp did not write {len(changed)} tensors in the type chosen for them (e.g. {name}: "
            f"{types[name]} asked, {written} written); report this with the model"
        )
    if file_bytes > allocation.budget_bytes:
        raise SrcrError(
            f"the file came out {file_bytes:,} bytes, over the budget of {allocation.budget_bytes:,}; report this"
        )


def _check_fidelity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    codes: Mapping[str, BlockCodes],
    weights: TensorSource | None,
) -> float | None:
    """The unrounded file against the model in PyTorch (fidelity.py). Not checked: a streamed model (PyTorch
    holds a skeleton), GPTQ codes (the file holds them rounded already), or SRCR_SKIP_CONVERSION_CHECK=1."""
    if weights is not None or codes or os.environ.get(SKIP_CHECK_VARIABLE, "") not in ("", "0"):
        return None
    return check_reproduces(model, tokenizer, path, str(next(model.parameters()).dtype).removeprefix("torch."))


# torch dtype name -> the GGUF type that holds it exactly.
_LOSSLESS = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def lossless_type(model: PreTrainedModel) -> str:
    """The GGUF type that holds the model's weights exactly (F32 for anything but a 16-bit checkpoint)."""
    return _LOSSLESS.get(str(next(model.parameters()).dtype).removeprefix("torch."), "F32")


SRCR_WRITER = "srcr (targets/gguf/convert.py)"


def writes_itself(config: PretrainedConfig) -> bool:
    """Whether srcr's own writer converts this family; every other goes through llama.cpp's converter."""
    return getattr(config, "model_type", None) in SUPPORTED_ARCHITECTURES


def convert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    file_type: str,
    hints: Mapping[str, object] | None,
    codes: Mapping[str, BlockCodes] | None = None,
    weights: TensorSource | None = None,
) -> tuple[dict[str, str], str]:
    """The model as an F32/F16/BF16 GGUF: ({HF weight name: GGUF tensor name}, which converter wrote it).
    Tensors come from `weights` when given (a streamed model's folder), else from the model."""
    if writes_itself(model.config):
        return convert_to_gguf(model, tokenizer, out, file_type, hints, codes, weights), SRCR_WRITER
    if codes:
        raise SrcrError("GPTQ codes can only be written by srcr's own GGUF writer")
    folder = weights.folder if isinstance(weights, SafetensorsFolder) else None
    return convert_with_llama_cpp(model, tokenizer, out, file_type, hints, folder)


def not_written_as_pinned(reader: gguf.GGUFReader, pinned: Mapping[str, str]) -> dict[str, str | None]:
    """{name: type written (None: absent)} of the tensors the file does not hold in their pinned type, by name."""
    found = {tensor.name: tensor.tensor_type.name for tensor in reader.tensors}
    return {name: found.get(name) for name, type_name in sorted(pinned.items()) if found.get(name) != type_name}


def check_written_as_solved(reader: gguf.GGUFReader, solved: Mapping[str, str]) -> dict[str, str]:
    """Confirm llama.cpp copied every GPTQ tensor (name -> type) unchanged (it copies a tensor already of
    the type it is pinned to); return {name: type} of the weight matrices it quantized itself."""
    if not solved:
        return {}
    changed = not_written_as_pinned(reader, solved)
    if changed:
        raise SrcrError(
            f"llama.cpp re-quantized {len(changed)} GPTQ tensors (e.g. {next(iter(changed))}); use --quantizer "
            "llama.cpp for this type"
        )
    return {
        tensor.name: tensor.tensor_type.name
        for tensor in reader.tensors
        if len(tensor.shape) >= 2 and tensor.name not in solved
    }


def _resolve_gptq(bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
    writable = ", ".join(GGML_TYPES)
    if quant_type is not None:
        name = quant_type.strip().upper()
        if name not in GGML_TYPES:
            raise SrcrError(f"--quantizer gptq writes {writable}, not {name}; pick one or use --quantizer llama.cpp")
        if bits is not None and bits != nominal_bits(name):
            raise SrcrError(f"--bits {bits} contradicts --quant-type {name} ({nominal_bits(name)}-bit); pass only one")
    else:
        bits = DEFAULT_BITS if bits is None else bits
        if bits not in GPTQ_BITS_TO_TYPE:
            raise SrcrError(
                f"--quantizer gptq writes {writable} (--bits {', '.join(map(str, GPTQ_BITS_TO_TYPE))}), not "
                f"{bits}-bit; use --quantizer llama.cpp for other widths"
            )
        name = GPTQ_BITS_TO_TYPE[bits]
    return QuantSpec(format="gguf", bits=nominal_bits(name), quant_type=name, options=dict(options), grid=name)


def imatrix_by_gguf_name(imatrix: Imatrix, names: Mapping[str, str]) -> dict:
    """Re-key an imatrix from Hugging Face weight names ("...q_proj.weight") to GGUF tensor names."""
    unknown = [name for name in imatrix if name not in names]
    if unknown:
        raise ValueError(f"imatrix names no weight of the model: {unknown[:3]}")
    return {names[name]: values for name, values in imatrix.items()}


def _check_loads(path: Path) -> None:
    """Let llama.cpp read the vocabulary back now, before minutes of quantization, to fail early."""
    reason = check_vocab_loads(str(path))
    if reason is not None:
        raise SrcrError(
            f"llama.cpp rejects the converted GGUF ({reason}); if the tokenizer is the cause, "
            "pass hints={'tokenizer_pre': NAME} with a pre-tokenizer llama.cpp knows"
        )
