"""GGUF target: convert with gguf-py, quantize and run with llama.cpp (llama-cpp-python)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np

from exporter.errors import SrcrError
from targets.base import ExportResult, ProgressFn, QuantSpec, no_progress
from targets.gguf.convert import SUPPORTED_ARCHITECTURES, architecture_spec, convert_to_gguf
from targets.gguf.llama_log import check_vocab_loads
from targets.gguf.quantize import (
    BITS_TO_TYPE,
    REQUIRES_IMATRIX,
    canonical_quant_type,
    f16_file_bytes,
    nominal_bits,
    quantize_gguf,
    tensor_type_mix,
)
from targets.gguf.runtime import LlamaCppRuntime, gpu_layers_for

__all__ = ["GGUFTarget", "LlamaCppRuntime", "SUPPORTED_ARCHITECTURES"]

# Options resolve_quant accepts; `pure` turns off llama.cpp's per-tensor K-quant mix.
_OPTIONS = ("pure",)


class GGUFTarget:
    name = "gguf"
    suffix = ".gguf"

    def resolve_quant(self, bits: int | None, quant_type: str | None, **options: Any) -> QuantSpec:
        options = {key: value for key, value in options.items() if value is not None}
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise SrcrError(f"GGUF does not take option(s) {', '.join(unknown)}; valid: {', '.join(_OPTIONS)}")
        if quant_type is not None:
            name = canonical_quant_type(quant_type)
            if bits is not None and bits != nominal_bits(name):
                raise SrcrError(
                    f"--bits {bits} contradicts --quant-type {name} ({nominal_bits(name)}-bit); pass only one"
                )
        else:
            bits = 4 if bits is None else bits
            if bits not in BITS_TO_TYPE:
                raise SrcrError(
                    f"GGUF supports --bits {', '.join(map(str, BITS_TO_TYPE))}, not {bits}; "
                    "or name a llama.cpp type with --quant-type"
                )
            name = BITS_TO_TYPE[bits]
        return QuantSpec(format=self.name, bits=nominal_bits(name), quant_type=name, options=options)

    def export(
        self,
        model: Any,
        tokenizer: Any,
        spec: QuantSpec,
        out: Path,
        imatrix: dict[str, np.ndarray] | None = None,
        hints: dict[str, Any] | None = None,
        progress: ProgressFn = no_progress,
    ) -> ExportResult:
        out = Path(out)
        architecture_spec(model.config)
        if spec.quant_type in REQUIRES_IMATRIX and not imatrix:
            raise SrcrError(
                f"{spec.quant_type} needs an importance matrix; export with calibration data "
                "or choose a K-quant such as Q2_K"
            )
        unquantized = spec.quant_type in ("F32", "F16")
        steps = 2 if unquantized else 3
        progress("convert to GGUF", 0, steps)
        stage_seconds: dict[str, float] = {}
        started = time.perf_counter()
        if unquantized:
            convert_to_gguf(model, tokenizer, out, spec.quant_type, hints)
            _check_loads(out)
            f16_bytes = f16_file_bytes(out)
            gguf_imatrix: dict[str, np.ndarray] = {}
        else:
            with _intermediate_file(out) as full_precision:
                names = convert_to_gguf(model, tokenizer, full_precision, "F32", hints)
                _check_loads(full_precision)
                f16_bytes = f16_file_bytes(full_precision)
                gguf_imatrix = imatrix_by_gguf_name(imatrix or {}, names)
                stage_seconds["convert"] = time.perf_counter() - started
                started = time.perf_counter()
                progress(f"quantize to {spec.quant_type}", 1, steps)
                quantize_gguf(
                    full_precision, out, spec.quant_type, gguf_imatrix or None, pure=spec.options.get("pure", False)
                )
        progress("measure", steps - 1, steps)
        mix = tensor_type_mix(out)
        stage_seconds["convert" if unquantized else "quantize"] = time.perf_counter() - started
        result = ExportResult(
            artifact=out,
            artifact_bytes=out.stat().st_size,
            f16_bytes=f16_bytes,
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


def imatrix_by_gguf_name(imatrix: dict[str, np.ndarray], names: dict[str, str]) -> dict[str, np.ndarray]:
    """Re-key an imatrix from Hugging Face weight names ("...q_proj.weight") to GGUF tensor names."""
    unknown = [name for name in imatrix if name not in names]
    if unknown:
        raise ValueError(f"imatrix names no weight of the model: {unknown[:3]}")
    return {names[name]: values for name, values in imatrix.items()}


@contextlib.contextmanager
def _intermediate_file(out: Path):
    """A temporary GGUF beside `out` (same filesystem), removed on success, error and Ctrl-C alike."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".f32.partial", dir=out.parent)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _check_loads(path: Path) -> None:
    """Let llama.cpp read the vocabulary back now, before minutes of quantization, to fail early."""
    reason = check_vocab_loads(str(path))
    if reason is not None:
        raise SrcrError(
            f"llama.cpp rejects the converted GGUF ({reason}); if the tokenizer is the cause, "
            "pass hints={'tokenizer_pre': NAME} with a pre-tokenizer llama.cpp knows"
        )
