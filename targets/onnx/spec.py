"""Turning `--bits/--quant-type` and the ONNX options into a validated QuantSpec, before any work.

quant_type names (accepted back as --quant-type):
  fp32, fp16                      unquantized; fp16 is stored as fp16 and computed in fp32
  MatMulNBits-q4-wls-b32          weight-only blocks: bits, algorithm, block size (+ "-sym" for rtn, gptq)
  int8-dynamic                    onnxruntime.quantization.quantize_dynamic: int8 weights and activations
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from srcr.base.errors import SrcrError
from srcr.base.grids import GRIDS
from srcr.base.shapes import linear_input_dims
from srcr.targets.base import (
    BUDGET_CHECK,
    BUDGET_OPTIONS,
    DEFAULT_BITS,
    QuantSpec,
    budget_request,
    check_budget_check,
)
from srcr.targets.onnx.matmul_nbits import ALGORITHMS

if TYPE_CHECKING:
    from transformers import PretrainedConfig

FORMAT = "onnx"
WEIGHT_ONLY, DYNAMIC, UNQUANTIZED = "weight-only", "dynamic", "none"
SCHEMES = (WEIGHT_ONLY, DYNAMIC)
BLOCK_BITS = (2, 4, 8)
FLOAT_BITS = (16, 32)
DEFAULT_BLOCK_SIZE = 32
# A budget's smallest block (targets/onnx/budget.py): every input width must be a multiple of it.
BUDGET_MIN_BLOCK = 32
# Measured on SmolLM2-135M at 4 bits, block 32 (docs/onnx.md): wls beats hqq and rtn on KL, bytes and speed.
DEFAULT_ALGO = "wls"
# srcr's GPTQ, run in the calibration pass and written from its codes (srcr.base.grids' MatMulNBits grids).
GPTQ = "gptq"
# Request options, named as their CLI flags (--quant-block-size, ...).
OPTIONS = ("quant_block_size", "symmetric", "quant_algo", "quant_scheme")
_BLOCK_TYPE = re.compile(r"^matmulnbits-q(?P<bits>\d+)-(?P<algo>[a-z]+)-b(?P<block>\d+)(?P<sym>-sym)?$")


def _from_quant_type(quant_type: str) -> dict[str, Any]:
    name = quant_type.strip().lower()
    if name in ("fp32", "f32", "float32"):
        return {"bits": 32}
    if name in ("fp16", "f16", "float16"):
        return {"bits": 16}
    if name == "int8-dynamic":
        return {"bits": 8, "quant_scheme": DYNAMIC}
    match = _BLOCK_TYPE.match(name)
    if match is None:
        raise SrcrError(
            f"unknown ONNX quant type {quant_type!r}; use fp32, fp16, int8-dynamic or e.g. MatMulNBits-q4-wls-b32"
        )
    parsed: dict[str, Any] = {
        "bits": int(match["bits"]),
        "quant_algo": match["algo"],
        "quant_block_size": int(match["block"]),
        "quant_scheme": WEIGHT_ONLY,
    }
    if match["sym"]:
        parsed["symmetric"] = True
    return parsed


def _check_bits(bits: int) -> None:
    if bits == 3:
        raise SrcrError(
            "ONNX Runtime's MatMulNBits has no 3-bit weights (only 2, 4 and 8); choose --bits 2, 4 or 8, "
            "or --format gguf for 3-bit"
        )
    if bits not in BLOCK_BITS + FLOAT_BITS:
        raise SrcrError(f"--bits {bits} is not available for ONNX; choose 2, 4 or 8 (quantized) or 16/32 (float)")


def _check_block_size(block_size: int) -> None:
    # MatMulNBits' own rule: a power of two, at least 16.
    if block_size < 16 or block_size & (block_size - 1):
        raise SrcrError(
            f"--quant-block-size {block_size} is invalid; use a power of two of at least 16 (16, 32, 64, 128)"
        )


def quant_type_name(bits: int, scheme: str, algo: str | None, block_size: int | None, symmetric: bool) -> str:
    if scheme == UNQUANTIZED:
        return f"fp{bits}"
    if scheme == DYNAMIC:
        return "int8-dynamic"
    return f"MatMulNBits-q{bits}-{algo}-b{block_size}" + ("-sym" if symmetric else "")


def _resolve_budget(bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
    from srcr.targets.onnx.budget import BPW_RANGE

    request = budget_request(bits, quant_type, options, BPW_RANGE, "MatMulNBits' 2-, 4- and 8-bit blocks")
    chosen = [key for key in (*OPTIONS, "quantizer") if options.get(key) is not None and key != "quant_scheme"]
    if options.get("quant_scheme") not in (None, WEIGHT_ONLY):
        chosen.append("quant_scheme")
    for key, default in (("quant_algo", DEFAULT_ALGO), ("quantizer", "ort")):
        if options.get(key) == default:
            chosen.remove(key)
    if chosen:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in chosen)
        raise SrcrError(
            f"a budget chooses every layer's MatMulNBits bits and block size itself, with srcr's wls quantizer; "
            f"drop {flags}"
        )
    spec_options = {"scheme": WEIGHT_ONLY, "algo": DEFAULT_ALGO, "block_size": None, "symmetric": False}
    return QuantSpec(FORMAT, request.nominal_bits, request.quant_type, {**spec_options, **request.spec_options()})


def resolve(bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
    check_budget_check(options)
    if any(options.get(key) is not None for key in BUDGET_OPTIONS):
        return _resolve_budget(bits, quant_type, options)
    options = {key: value for key, value in options.items() if key not in (*BUDGET_OPTIONS, BUDGET_CHECK)}
    quantizer = options.get("quantizer")
    if quantizer not in (None, "ort", GPTQ):
        raise SrcrError(f"unknown --quantizer {quantizer!r} for ONNX; choose ort (the default) or gptq")
    options = {key: value for key, value in options.items() if key != "quantizer"}
    if quantizer == GPTQ:
        if options.get("quant_algo") not in (None, GPTQ):
            raise SrcrError(f"--quant-algo {options['quant_algo']} contradicts --quantizer gptq; drop one of them")
        options["quant_algo"] = GPTQ
    unknown = sorted(key for key, value in options.items() if key not in OPTIONS and value is not None)
    if unknown:
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in unknown)
        valid = ", ".join(f"--{key.replace('_', '-')}" for key in OPTIONS)
        raise SrcrError(f"{flags} do not apply to --format onnx (its options: {valid}); drop them")
    options = {key: value for key, value in options.items() if value is not None}
    if quant_type:
        parsed = _from_quant_type(quant_type)
        if bits is not None and bits != parsed["bits"]:
            raise SrcrError(f"--bits {bits} contradicts --quant-type {quant_type}; pass only one of them")
        for key, value in parsed.items():
            if key != "bits" and key in options and options[key] != value:
                raise SrcrError(f"--{key.replace('_', '-')} {options[key]} contradicts --quant-type {quant_type}")
        options = {**options, **{key: value for key, value in parsed.items() if key != "bits"}}
        bits = parsed["bits"]
    bits = DEFAULT_BITS if bits is None else int(bits)
    _check_bits(bits)

    scheme = options.get("quant_scheme", WEIGHT_ONLY)
    if scheme not in SCHEMES:
        raise SrcrError(f"unknown --quant-scheme {scheme!r}; use {' or '.join(SCHEMES)}")
    if options.get("quant_algo") == GPTQ and (bits in FLOAT_BITS or scheme == DYNAMIC):
        raise SrcrError(
            f"--quantizer gptq writes weight-only MatMulNBits blocks (--bits 2, 4 or 8), not "
            f"{'int8-dynamic' if scheme == DYNAMIC else f'{bits}-bit floats'}; drop --quantizer gptq"
        )
    if scheme == DYNAMIC and bits != 8:
        raise SrcrError("--quant-scheme dynamic quantizes to int8; use it with --bits 8")
    if bits in FLOAT_BITS:
        spec_options = {"scheme": UNQUANTIZED}
        return QuantSpec(FORMAT, bits, quant_type_name(bits, UNQUANTIZED, None, None, False), spec_options)
    if scheme == DYNAMIC:
        return QuantSpec(FORMAT, 8, quant_type_name(8, DYNAMIC, None, None, False), {"scheme": DYNAMIC})

    algo = str(options.get("quant_algo", DEFAULT_ALGO)).lower()
    if algo not in (*ALGORITHMS, GPTQ):
        raise SrcrError(f"unknown --quant-algo {algo!r}; use one of {', '.join(ALGORITHMS)} (or --quantizer gptq)")
    symmetric = bool(options.get("symmetric", False))
    if symmetric and algo not in ("rtn", GPTQ):
        raise SrcrError(f"--symmetric needs --quant-algo rtn or --quantizer gptq: {algo} blocks are asymmetric")
    block_size = int(options.get("quant_block_size", DEFAULT_BLOCK_SIZE))
    _check_block_size(block_size)
    spec_options = {"scheme": WEIGHT_ONLY, "algo": algo, "block_size": block_size, "symmetric": symmetric}
    name = quant_type_name(bits, WEIGHT_ONLY, algo, block_size, symmetric)
    if algo != GPTQ:
        return QuantSpec(FORMAT, bits, name, spec_options)
    grid = f"MatMulNBits-q{bits}" + ("-sym" if symmetric else "")
    if grid not in GRIDS or block_size != GRIDS[grid].block:
        raise SrcrError(
            f"--quantizer gptq writes MatMulNBits with 2-, 4- or 8-bit blocks of {DEFAULT_BLOCK_SIZE} "
            f"(--bits 2, 4 or 8, --quant-block-size {DEFAULT_BLOCK_SIZE}), not {bits}-bit blocks of {block_size}; "
            "use ONNX Runtime's quantizers (--quant-algo) for others"
        )
    return QuantSpec(FORMAT, bits, name, spec_options, grid=grid)


def check_block_size_fits(config: PretrainedConfig, spec: QuantSpec) -> None:
    """Every quantized matrix's input dimension must be a whole number of blocks."""
    block_size = spec.options.get("block_size") or (BUDGET_MIN_BLOCK if spec.allocates else None)
    if spec.options.get("scheme") != WEIGHT_ONLY or block_size is None:
        return
    try:
        dims = linear_input_dims(config)
    except (AttributeError, TypeError):
        raise SrcrError(
            f"the ONNX target needs a Llama-style config (hidden_size, intermediate_size, heads); "
            f"{type(config).__name__} lacks one"
        ) from None
    misfits = {name: dim for name, dim in dims.items() if dim % block_size}
    if not misfits:
        return
    name, dim = next(iter(misfits.items()))
    common = math.gcd(*dims.values())
    fitting = [str(size) for size in (16, 32, 64, 128, 256) if common % size == 0]
    advice = f"choose --quant-block-size {' or '.join(fitting)}" if fitting else "use --bits 16 or --format gguf"
    raise SrcrError(f"--quant-block-size {block_size} does not divide the input dimension {dim} of {name}; {advice}")
