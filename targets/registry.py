"""The deployment targets by --format name. A new format is one folder under targets/ and one line here."""

from __future__ import annotations

import importlib

from srcr.base.errors import SrcrError
from srcr.targets.base import Target

# --format name -> "module:class"; imported only when asked for, so each format's libraries load on demand.
TARGETS: dict[str, str] = {
    "gguf": "srcr.targets.gguf.target:GGUFTarget",
    "onnx": "srcr.targets.onnx.target:ONNXTarget",
}
FORMATS = tuple(TARGETS)


def get_target(name: str) -> Target:
    key = name.strip().lower()
    if key not in TARGETS:
        raise SrcrError(f"unknown --format {name!r}; choose one of: {', '.join(FORMATS)}")
    module_name, class_name = TARGETS[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)()
