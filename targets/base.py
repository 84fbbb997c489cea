"""The contract between the pipeline, the deployment targets and the evaluators.

A target is an adapter: it turns an in-memory (pruned) Hugging Face model into one deployable
artifact at a quantization setting, and opens that artifact in its own runtime. Evaluators only
ever see the `Runtime` interface, so GGUF and ONNX artifacts are measured by the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

# (description, completed, total): called by long-running steps so the CLI can draw progress.
ProgressFn = Callable[[str, int, int], None]


def no_progress(description: str, completed: int, total: int) -> None:
    return None


@dataclass(frozen=True)
class QuantSpec:
    """A resolved quantization request: validated by the target before any expensive work."""

    format: str
    bits: int
    quant_type: str  # the format's own name, e.g. "Q4_K_M" (GGUF) or "MatMulNBits-rtn" (ONNX)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    artifact: Path
    artifact_bytes: int
    f16_bytes: int  # what the same tensors take at 16 bits: the denominator of actual compression
    bits_per_weight: float  # measured over the quantized (2-D weight) tensors
    quantization: dict[str, Any]  # format-specific: type, type mix, imatrix use, block size, ...
    format_info: dict[str, Any]  # library/runtime versions, opset, ...
    # Wall time of the export's own steps ("convert", "quantize"), so the manifest can split them.
    stage_seconds: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class Runtime(Protocol):
    """What evaluators may ask of a deployed artifact. Token ids are the model's own vocabulary."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids for `text`, without BOS or other special tokens."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), vocab]: row i is log p(next token | tokens[: i + 1])."""
        ...

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `tokens` (new tokens only), stopping early at end-of-sequence."""
        ...

    def info(self) -> dict[str, Any]:
        """Runtime name, version and the execution provider/backend that actually ran."""
        ...

    def close(self) -> None: ...


class Target(Protocol):
    name: str  # "gguf" | "onnx"
    suffix: str  # artifact file suffix, e.g. ".gguf"

    def resolve_quant(self, bits: int | None, quant_type: str | None, **options: Any) -> QuantSpec:
        """Validate and resolve a quantization request; raise SrcrError naming the fix if impossible."""
        ...

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
        """Write the artifact to `out` (the caller guarantees `out` is a fresh temporary path)."""
        ...

    def open_runtime(self, artifact: Path, device: str = "auto") -> Runtime: ...
