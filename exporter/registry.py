"""The registry of deployment targets, so the pipeline and CLI never import a target's internals."""

from __future__ import annotations

from exporter.errors import SrcrError
from targets.base import Target

FORMATS = ("gguf", "onnx")


def get_target(fmt: str) -> Target:
    fmt = fmt.lower()
    if fmt == "gguf":
        from targets.gguf import GGUFTarget

        return GGUFTarget()
    if fmt == "onnx":
        from targets.onnx import ONNXTarget

        return ONNXTarget()
    raise SrcrError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
