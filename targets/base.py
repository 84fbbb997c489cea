"""The contract between the pipeline and a deployment target.

A target is an adapter: it checks that a model and a quantization request fit its format (before any
expensive stage runs), turns an in-memory (pruned) Hugging Face model into one deployable artifact,
and opens that artifact in its own runtime. Evaluators only ever see the `Runtime` interface
(srcr.base.runtime), so GGUF and ONNX artifacts are measured by the same code. Adding a format is a
folder under targets/ with a class implementing `Target`, and one line in targets/registry.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from srcr.base.allocation import KlCurve, WholeModelKl
from srcr.base.errors import SrcrError
from srcr.base.gram import GptqSolver
from srcr.base.grids import BlockCodes
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.base.weights import TensorSource

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# The bit-width when the user names neither --bits nor --quant-type, for every format.
DEFAULT_BITS = 4

# Per-input-column importance of every quantized weight, keyed by Hugging Face weight name
# ("model.layers.0.self_attn.q_proj.weight"): the mean square of its calibration inputs.
Imatrix = Mapping[str, np.ndarray]


# Options that ask the target to choose each tensor's storage itself, to fit a file size or bits per weight.
BUDGET_OPTIONS = ("budget_mb", "budget_bpw")
# With a budget: measure the additive choice and its alternatives on the whole model, keep the best.
BUDGET_CHECK = "budget_check"
# The `quantizer` option's value for a budget whose matrices are rounded by the format's quantizer or
# srcr's GPTQ, whichever is predicted to lose less for each.
PER_TENSOR_GPTQ = "auto"


@dataclass(frozen=True)
class BudgetRequest:
    """--budget-mb N or --budget-bpw B, validated."""

    key: str  # one of BUDGET_OPTIONS
    value: float
    check: bool = False  # --budget-check: candidates measured on the whole model (srcr.base.allocation)

    @property
    def quant_type(self) -> str:
        """The spec's name for it, e.g. "budget-15.9MB" or "budget-4.5bpw"."""
        return f"budget-{self.value:g}MB" if self.key == "budget_mb" else f"budget-{self.value:g}bpw"

    @classmethod
    def of(cls, spec: QuantSpec) -> BudgetRequest:
        """The budget a resolved spec carries (`spec.allocates`)."""
        key = next(key for key in BUDGET_OPTIONS if key in spec.options)
        return cls(key, float(spec.options[key]), bool(spec.options.get(BUDGET_CHECK, False)))  # type: ignore[arg-type]

    def spec_options(self) -> dict[str, object]:
        """What a resolved spec's options hold of the request."""
        return {self.key: self.value, **({BUDGET_CHECK: True} if self.check else {})}

    @property
    def nominal_bits(self) -> int:
        """A whole bit-width to stand for the request until the allocation is made (the manifest takes the
        measured bits per weight)."""
        return max(2, min(8, round(self.value))) if self.key == "budget_bpw" else DEFAULT_BITS


def budget_request(
    bits: int | None, quant_type: str | None, options: Mapping[str, object], bpw_range: tuple[float, float], types: str
) -> BudgetRequest:
    """The one budget in `options`; SrcrError when it is malformed, out of `bpw_range` (what the format's
    `types` span) or given beside --bits / --quant-type."""
    given = [key for key in BUDGET_OPTIONS if options.get(key) is not None]
    if len(given) > 1:
        raise SrcrError("pass --budget-mb or --budget-bpw, not both")
    if bits is not None or quant_type is not None:
        raise SrcrError("a budget chooses the type of every tensor itself; drop --bits / --quant-type")
    key = given[0]
    try:
        value = float(options[key])  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SrcrError(f"--{key.replace('_', '-')} takes a number, not {options[key]!r}") from None
    low, high = bpw_range
    if key == "budget_bpw" and not low <= value <= high:
        raise SrcrError(f"--budget-bpw {value:g} is outside what {types} span here ({low:g} to {high:g} bits)")
    if key == "budget_mb" and not value > 0:
        raise SrcrError(f"--budget-mb must be positive, not {value:g}")
    return BudgetRequest(key, value, bool(options.get(BUDGET_CHECK)))


def check_budget_check(options: Mapping[str, object]) -> None:
    """--budget-check without a budget is refused: it measures a budget's candidate allocations."""
    if options.get(BUDGET_CHECK) and not any(options.get(key) is not None for key in BUDGET_OPTIONS):
        raise SrcrError("--budget-check measures a budget's candidates; add --budget-mb or --budget-bpw, or drop it")


def check_budget_floor(
    spec: QuantSpec, shapes: list[tuple[int, int]], smallest_bytes: Callable[[int, int], int], format_name: str,
    smallest: str, in_smallest: str,
) -> None:  # fmt: skip
    """For a budget: SrcrError naming the floor when the weight matrices of these [rows, columns] shapes
    cannot fit even in the format's smallest storage (`smallest_bytes`, described as `smallest` and, after
    "in", `in_smallest`); no-op otherwise."""
    if not spec.allocates:
        return
    request = BudgetRequest.of(spec)
    floor = sum(smallest_bytes(rows, columns) for rows, columns in shapes)
    weights = sum(rows * columns for rows, columns in shapes)
    if request.key == "budget_bpw" and request.value < 8 * floor / weights:
        raise SrcrError(
            f"{smallest} for this model's matrices take {8 * floor / weights:.3f} bits per weight; raise --budget-bpw"
        )
    if request.key == "budget_mb" and request.value * 1e6 < floor:
        raise SrcrError(
            f"no {format_name} of this model fits {request.value:.2f} MB: its weight matrices alone take at least "
            f"{floor / 1e6:.2f} MB in {in_smallest}; raise --budget-mb"
        )


@dataclass(frozen=True)
class QuantSpec:
    """A resolved quantization request: validated by the target before any expensive work."""

    format: str
    bits: int
    quant_type: str  # the format's own name, e.g. "Q4_K_M" (GGUF) or "MatMulNBits-q4-wls-b32" (ONNX)
    options: Mapping[str, object] = field(default_factory=dict)
    # srcr's GPTQ rounds onto this block grid (srcr.base.grids) during calibration and the target writes
    # the codes as they are; None: the format's own quantizer quantizes the float weights.
    grid: str | None = None

    @property
    def allocates(self) -> bool:
        """Whether the target picks a type per tensor for a budget, from the `sensitivity` export is given."""
        return any(key in self.options for key in BUDGET_OPTIONS)

    @property
    def per_tensor_gptq(self) -> bool:
        """Whether srcr's GPTQ competes with the format's quantizer matrix by matrix within the budget
        (--quantizer auto): export is then given a `gptq` solver, and the sensitivities in its metric."""
        return self.allocates and self.options.get("quantizer") == PER_TENSOR_GPTQ


@dataclass
class ExportResult:
    artifact: Path
    artifact_bytes: int  # everything the device stores: the file(s), header and tokenizer included
    bits_per_weight: float  # measured over the quantized (2-D weight) tensors
    quantization: dict[str, object]  # format-specific: type, type mix, imatrix use, block size, ...
    format_info: dict[str, object]  # library/runtime versions, opset, ...
    # Wall time of the export's own steps ("convert", "quantize"), so the manifest can split them.
    stage_seconds: dict[str, float] = field(default_factory=dict)


class Target(Protocol):
    name: str  # the --format value, e.g. "gguf"
    suffix: str  # artifact file suffix, e.g. ".gguf"
    # Whether `export` converts tensor by tensor from `weights` (a model too large for memory, streamed).
    streams: bool

    def resolve_quant(self, bits: int | None, quant_type: str | None, options: Mapping[str, object]) -> QuantSpec:
        """Validate and resolve a quantization request; raise SrcrError naming the fix if impossible.

        Needs no model: called before anything is loaded.
        """
        ...

    def check_structure(self, config: PretrainedConfig, drops_layers: bool, per_layer_widths: bool) -> None:
        """Raise SrcrError when the format cannot hold this model after structured pruning: with layers
        removed, or with decoder layers of different widths (the global width allocation)."""
        ...

    def width_multiple(self, spec: QuantSpec) -> int:
        """The multiple a weight matrix's input width should be for `spec` to quantize it as asked
        (a block size); structured pruning rounds the widths it keeps to it. 1 when anything goes."""
        ...

    def check_model(self, config: PretrainedConfig, spec: QuantSpec) -> None:
        """Every limit of the format that depends on the model (architecture, shapes), from its config
        alone: called before the weights are loaded, so an unsupported model costs seconds, not minutes."""
        ...

    def check_files(self, folder: Path, config: PretrainedConfig) -> None:
        """Limits of the format that depend on the model folder's side files (its tokenizer): called, like
        `check_model`, before any weight is loaded or calibration runs."""
        ...

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
        """Write the artifact to `out` (the caller guarantees `out` is a fresh temporary path).

        `codes` (Hugging Face weight name -> codes and scales on `spec.grid`) are written as they are.
        With `weights` (only where `streams`), tensors are read from there one at a time and `model` is
        a skeleton that gives the config and shapes. `sensitivity` (Hugging Face weight name -> its KL curve,
        the predicted mean KL at a relative error, exporter/sensitivity.py) is given when `spec.allocates`,
        and with it `whole_model_kl` (the model's KL with weights replaced, by Hugging Face name), on which
        the allocation and its alternatives are measured together. `gptq` (srcr.base.gram) is given when
        `spec.per_tensor_gptq`: srcr's GPTQ as a second quantizer per matrix.
        """
        ...

    def check_budget(self, shapes: list[tuple[int, int]], spec: QuantSpec) -> None:
        """For a budget (`spec.allocates`): raise SrcrError naming the smallest budget when even the format's
        smallest storage of weight matrices of these [rows, columns] shapes cannot fit; no-op otherwise."""
        ...

    def for_checkpoint(self, spec: QuantSpec, dtype: str) -> QuantSpec:
        """The spec for a checkpoint stored in `dtype` ("bfloat16", ...): e.g. its own 16-bit type."""
        ...

    def reference_spec(self, dtype: str) -> QuantSpec:
        """The unquantized file the reference pack is computed on when the model is streamed."""
        ...

    def open_runtime(self, artifact: Path, device: str = "auto") -> Runtime:
        """The artifact in the format's runtime; a damaged or foreign file raises SrcrError."""
        ...
