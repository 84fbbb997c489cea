"""srcr: prune, quantize and export LLMs for edge runtimes, and measure what the deployed file retains.

The package has four layers, each importing only the ones below it (docs/architecture.md):
`srcr.base` (errors, progress, files, compression formulas, the runtime interface), then
`srcr.targets` (GGUF, ONNX) and `srcr.evaluators` (metrics on any runtime), then `srcr.exporter`
(the CLI, the Python API and the pipeline).

The Python API (docs/api.md) is here at the top: `srcr.export(model, recipe) -> Manifest`, `srcr.sweep`,
`srcr.verify`, `srcr.Recipe`, `srcr.load_recipe`, `srcr.SrcrError`. They are imported when first used, so
`import srcr` stays light (the CLI reads the version from here before it knows what it will run).
"""

from pathlib import Path

__version__ = "0.6.0"

_API = {
    "export": ("srcr.exporter.api", "export"),
    "sweep": ("srcr.exporter.api", "sweep"),
    "verify": ("srcr.exporter.api", "verify"),
    "load_recipe": ("srcr.exporter.api", "load_recipe"),
    "Recipe": ("srcr.exporter.recipe", "Recipe"),
    "Manifest": ("srcr.exporter.manifest", "Manifest"),
    "SrcrError": ("srcr.base.errors", "SrcrError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name not in _API:
        raise AttributeError(f"module 'srcr' has no attribute {name!r}")
    import importlib

    module, attribute = _API[name]
    return getattr(importlib.import_module(module), attribute)


# Installed, setuptools maps srcr.exporter, srcr.targets and srcr.evaluators to the repository's
# folders of those names. Run from a source checkout without installing (the GPU check copies the
# tree to a bare machine), the same folders beside this package are found through __path__.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "exporter" / "cli.py").is_file():
    __path__.append(str(_checkout))
