"""The layers import downward only (docs/architecture.md), read from the source itself.

srcr.base imports nothing of srcr's; srcr.targets and srcr.evaluators import srcr.base (and, for
targets, themselves) but never srcr.exporter, and evaluators never srcr.targets: evaluators see only
the runtime interface. Every module is found by walking the folders, so a new file is covered.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = {"srcr.base": REPO / "srcr" / "base", "srcr.targets": REPO / "targets"}
PACKAGES |= {"srcr.evaluators": REPO / "evaluators", "srcr.exporter": REPO / "exporter"}
# What each layer may import of srcr (besides itself and the top-level package's __version__).
ALLOWED = {
    "srcr.base": set(),
    "srcr.targets": {"srcr.base"},
    "srcr.evaluators": {"srcr.base"},
    "srcr.exporter": {"srcr.base", "srcr.targets", "srcr.evaluators"},
}


def srcr_imports(path: Path) -> set[str]:
    """Every srcr module a file imports, at top level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name == "srcr" or name.startswith("srcr.")}


def layer_of(module: str) -> str | None:
    return next((layer for layer in PACKAGES if module == layer or module.startswith(f"{layer}.")), None)


def modules() -> list[tuple[str, Path]]:
    found = []
    for layer, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            found.append((layer, path))
    return found


@pytest.mark.parametrize(("layer", "path"), modules(), ids=lambda value: str(value).replace(str(REPO) + "/", ""))
def test_layers_import_downward_only(layer, path):
    for imported in srcr_imports(path):
        if imported in ("srcr", "srcr.__version__"):
            continue
        target = layer_of(imported)
        assert target is not None, f"{path.name} imports {imported}, which is in no layer"
        assert target == layer or target in ALLOWED[layer], f"{path} ({layer}) imports {imported} ({target})"


def test_the_graph_checker_sees_a_violation(tmp_path):
    """The check itself must be able to fail: an evaluator importing the exporter is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from srcr.exporter.pipeline import run_export\n")
    imported = srcr_imports(bad)
    assert "srcr.exporter.pipeline" in imported
    assert layer_of("srcr.exporter.pipeline") not in ALLOWED["srcr.evaluators"] | {"srcr.evaluators"}


@pytest.mark.parametrize("package", ["srcr.base", "srcr.targets", "srcr.evaluators", "srcr.exporter"])
def test_packages_import_under_the_srcr_namespace(package):
    module = importlib.import_module(package)
    assert Path(module.__file__).resolve().parent == PACKAGES[package].resolve()


def test_no_generic_top_level_packages_are_installed():
    """`exporter`, `targets` and `evaluators` must not be importable as top-level names from site-packages."""
    import importlib.util
    import sys

    outside_repo = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO]
    for name in ("exporter", "targets", "evaluators"):
        spec = importlib.machinery.PathFinder.find_spec(name, outside_repo)
        assert spec is None, f"a top-level `{name}` package is importable from {spec.origin}"


def test_every_format_and_method_is_registered_once():
    from srcr.exporter.pruning.method import PruningMethod
    from srcr.exporter.pruning.registry import METHODS
    from srcr.targets.registry import TARGETS, get_target

    for name in TARGETS:
        target = get_target(name)
        assert target.name == name
        for member in ("resolve_quant", "check_model", "export", "open_runtime"):
            assert callable(getattr(target, member)), (name, member)
    assert all(issubclass(method, PruningMethod) and method.summary for method in METHODS.values())


def test_a_new_method_is_one_class_and_one_registry_line(monkeypatch):
    """The walk-through in docs/architecture.md, run: a method plugged in by one registry line prunes a model."""
    import torch
    from conftest import make_tiny_llama

    from srcr.exporter.pruning import PruneSpec, prune_model, registry
    from srcr.exporter.pruning.masks import lowest_per_row_mask
    from srcr.exporter.pruning.method import PruningMethod

    class MeanAbs(PruningMethod):
        summary = "|w| × mean |x|, lowest per output row"

        def __init__(self, linears, spec, statistics):
            super().__init__(linears, spec, statistics)
            self.sum_abs = torch.zeros(statistics.columns)
            self.tokens = 0

        def observe(self, inputs):
            self.sum_abs += inputs.abs().sum(0)
            self.tokens += inputs.shape[0]

        def prune(self):
            scale = self.sum_abs / max(self.tokens, 1)
            for linear in self.linears.values():
                mask = lowest_per_row_mask(linear.weight.abs().float() * scale, self.spec.sparsity)
                linear.weight.data.masked_fill_(mask, 0)

    monkeypatch.setitem(registry.METHODS, "mean-abs", MeanAbs)

    class Vocab:
        def __len__(self):
            return 256

        bos_token_id, eos_token_id = 1, 2

    model = make_tiny_llama(Vocab())
    report = prune_model(model, torch.randint(3, 256, (2, 32)), PruneSpec(method="mean-abs", sparsity=0.5))
    assert report.overall_sparsity == 0.5
    assert all(row.sparsity == 0.5 for row in report.per_layer)
