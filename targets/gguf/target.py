"""The GGUF target: convert with gguf-py, quantize and run with llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import importlib.metadata
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import llama_cpp

from srcr.base.child import run_in_child
from srcr.base.errors import SrcrError
from srcr.base.files import temp_name
from srcr.base.progress import ProgressFn, no_progress
from srcr.targets.base import DEFAULT_BITS, ExportResult, Imatrix, QuantSpec
from srcr.targets.gguf.convert import architecture_spec, convert_to_gguf, rope_parameters
from srcr.targets.gguf.llama_log import check_vocab_loads
from srcr.targets.gguf.quantize import (
    BITS_TO_TYPE,
    block_width,
    canonical_quant_type,
    nominal_bits,
    quantize_gguf,
    tensor_type_mix,
)
from srcr.targets.gguf.runtime import LlamaCppRuntime, gpu_layers_for

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# Options resolve_quant accepts; `pure` turns off llama.cpp's per-tensor K-quant mix.
_OPTIONS = ("pure",)
UNQUANTIZED = ("F32", "F16")


class GGUFTarget:
    name = "gguf"
    suffix = ".gguf"

    def resolve_quant(self, bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
        options = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            flags = ", ".join(f"--{key.replace('_', '-')}" for key in unknown)
            raise SrcrError(f"{flags} do not apply to --format gguf (its options: --pure); drop them")
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

    def per_layer_widths(self, config: PretrainedConfig) -> bool:
        # Written as llama.cpp's `deci` architecture, which is Llama with per-layer widths.
        return architecture_spec(config).gguf_arch == gguf.MODEL_ARCH.LLAMA

    def width_multiple(self, spec: QuantSpec) -> int:
        return block_width(spec.quant_type)

    def check_model(self, config: PretrainedConfig, spec: QuantSpec) -> None:
        architecture_spec(config)
        rope_parameters(config)

    def export(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        spec: QuantSpec,
        out: Path,
        imatrix: Imatrix | None = None,
        hints: Mapping[str, object] | None = None,
        progress: ProgressFn = no_progress,
    ) -> ExportResult:
        out = Path(out)
        unquantized = spec.quant_type in UNQUANTIZED
        steps = 2 if unquantized else 3
        progress("convert to GGUF", 0, steps)
        stage_seconds: dict[str, float] = {}
        started = time.perf_counter()
        if unquantized:
            convert_to_gguf(model, tokenizer, out, spec.quant_type, hints)
            _check_loads(out)
            gguf_imatrix: dict = {}
        else:
            # The full-precision intermediate lies beside the artifact under a temporary name of its own.
            full_precision = out.parent / temp_name(f"{out.name}.f32")
            try:
                names = convert_to_gguf(model, tokenizer, full_precision, "F32", hints)
                _check_loads(full_precision)
                gguf_imatrix = imatrix_by_gguf_name(imatrix or {}, names)
                stage_seconds["convert"] = time.perf_counter() - started
                started = time.perf_counter()
                progress(f"quantize to {spec.quant_type}", 1, steps)
                # In a child process: Ctrl-C stops it at once, and a crash in llama.cpp stays one line.
                run_in_child(
                    f"llama.cpp's quantizer ({spec.quant_type})",
                    quantize_gguf,
                    full_precision,
                    out,
                    spec.quant_type,
                    gguf_imatrix or None,
                    None,
                    bool(spec.options.get("pure", False)),
                )
            finally:
                full_precision.unlink(missing_ok=True)
        progress("measure", steps - 1, steps)
        mix = tensor_type_mix(out)
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
            },
            format_info={
                "gguf_version": gguf.GGUF_VERSION,
                "llama_cpp_python": llama_cpp.__version__,
                "gguf_py": importlib.metadata.version("gguf"),
            },
            stage_seconds={name: round(seconds, 3) for name, seconds in stage_seconds.items()},
        )
        progress("measure", steps, steps)
        return result

    def open_runtime(self, artifact: Path, device: str = "auto") -> LlamaCppRuntime:
        return LlamaCppRuntime(Path(artifact), n_gpu_layers=gpu_layers_for(device))


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
