"""The pruning methods by --method name: one line each."""

from __future__ import annotations

from srcr.base.errors import SrcrError
from srcr.exporter.pruning.magnitude import Magnitude
from srcr.exporter.pruning.method import PruningMethod
from srcr.exporter.pruning.sparsegpt import SparseGPT
from srcr.exporter.pruning.spec import PruneSpec, check_generic
from srcr.exporter.pruning.wanda import Wanda

METHODS: dict[str, type[PruningMethod]] = {
    "magnitude": Magnitude,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
}
DEFAULT_METHOD = "sparsegpt"


def method_class(name: str) -> type[PruningMethod]:
    if name not in METHODS:
        raise SrcrError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def validate_spec(spec: PruneSpec) -> None:
    """Refuse a request before any weight is touched (before the model is even loaded)."""
    method = method_class(spec.method)
    check_generic(spec)
    method.check(spec)


def methods_help() -> str:
    return "; ".join(f"{name}: {cls.summary}" for name, cls in METHODS.items())
