"""srcr: prune, quantize and export LLMs for edge runtimes, and measure what the deployed file retains.

The package has four layers, each importing only the ones below it (docs/architecture.md):
`srcr.base` (errors, progress, files, compression formulas, the runtime interface), then
`srcr.targets` (GGUF, ONNX) and `srcr.evaluators` (metrics on any runtime), then `srcr.exporter`
(the CLI and the pipeline).
"""

from pathlib import Path

__version__ = "0.3.0"

# Installed, setuptools maps srcr.exporter, srcr.targets and srcr.evaluators to the repository's
# folders of those names. Run from a source checkout without installing (the GPU check copies the
# tree to a bare machine), the same folders beside this package are found through __path__.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "exporter" / "cli.py").is_file():
    __path__.append(str(_checkout))
