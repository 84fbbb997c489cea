"""The deployment manifest: what was done to which model, what came out, and how much meaning survived.

docs/manifest.md documents every field; bump SCHEMA_VERSION when a field changes meaning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from evaluators.retention import SRCR_DEFINITION
from exporter import __version__
from exporter.compression import actual_compression
from exporter.errors import SrcrError
from exporter.models import LoadedModel
from targets.base import ExportResult, QuantSpec

SCHEMA_VERSION = 1
LIBRARIES = ("torch", "transformers", "gguf", "llama-cpp-python", "onnx", "onnxruntime-gpu", "onnxruntime")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def device_section(device: str) -> dict[str, Any]:
    section: dict[str, Any] = {"prune": device, "machine": platform.machine(), "system": platform.system()}
    if device == "cuda":
        import torch

        section["gpu"] = torch.cuda.get_device_name(0)
    return section


def evaluation_section(figures: dict[str, Any] | None, pack: Any, reference: Path) -> dict[str, Any] | None:
    """Figures from the evaluators plus where the reference pack lives (relative to the manifest)."""
    if figures is None:
        return None
    return {
        **figures,
        "reference_pack": {"file": reference.name},
        "settings": pack.settings_dict() if hasattr(pack, "settings_dict") else None,
    }


def build_manifest(
    *,
    name: str,
    loaded: LoadedModel,
    spec: QuantSpec,
    result: ExportResult,
    artifact_file: Path,
    pruning: dict[str, Any],
    tcr_value: float,
    evaluation: dict[str, Any] | None,
    device: str,
    timings: dict[str, float],
    reference_file: Path | None = None,
) -> dict[str, Any]:
    actual = actual_compression(result.artifact_bytes, result.f16_bytes)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "tool": {"name": "srcr", "version": __version__},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "name": name,
        "format": spec.format,
        "source_model": {
            "id": loaded.source,
            "path": str(loaded.path),
            "architecture": loaded.architecture,
            "parameters": loaded.n_params,
            "weights_sha256": loaded.weights_sha256,
        },
        "pruning": pruning,
        "quantization": {"bits": spec.bits, "type": spec.quant_type, **spec.options, **result.quantization},
        "artifact": {
            "file": result.artifact.name,
            "sha256": sha256_of(artifact_file),
            "bytes": result.artifact_bytes,
            "f16_bytes": result.f16_bytes,
            "bits_per_weight": result.bits_per_weight,
            **result.format_info,
        },
        "compression": {"tcr": tcr_value, "actual": actual},
        "evaluation": evaluation,
        "srcr_definition": SRCR_DEFINITION,
        "versions": library_versions(),
        "device": device_section(device),
        "timings_s": timings,
    }
    if evaluation is not None:
        sr = evaluation["sr"]
        manifest["sr"] = sr
        manifest["srcr"] = sr * tcr_value
        manifest["sr_actual"] = sr * actual
        if reference_file is not None:
            evaluation["reference_pack"]["sha256"] = sha256_of(reference_file)
            evaluation["reference_pack"]["bytes"] = reference_file.stat().st_size
    return manifest


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SrcrError(f"manifest {path} does not exist; pass the <name>.manifest.json that srcr export wrote")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise SrcrError(f"{path} is not valid JSON; pass a manifest written by srcr export") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest:
        raise SrcrError(f"{path} is not an srcr manifest; pass a <name>.manifest.json written by srcr export")
    if manifest["schema_version"] > SCHEMA_VERSION:
        raise SrcrError(f"{path} uses manifest schema {manifest['schema_version']}; upgrade srcr to read it")
    return manifest
