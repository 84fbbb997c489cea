"""`srcr verify`: on the device, with only the artifact, its manifest and its reference pack.

Checks that the files are the ones exported (sha256), re-runs the evaluators through the
deployment runtime, and compares every figure with the manifest within tolerances.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import SrcrError
from exporter.manifest import read_manifest, sha256_of
from exporter.registry import get_target
from targets.base import ProgressFn, no_progress


@dataclass
class VerifyOutcome:
    manifest: dict[str, Any]
    checks: list[Any]  # evaluators.verify.FigureCheck
    measured: dict[str, Any]
    peak_rss_mb: float

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)


def _check_file(folder: Path, entry: dict[str, Any], what: str) -> Path:
    path = folder / entry["file"]
    if not path.is_file():
        raise SrcrError(f"{what} {path} is missing; copy it next to the manifest")
    if sha256_of(path) != entry["sha256"]:
        raise SrcrError(
            f"{what} {path.name} does not match the manifest's sha256: the file changed since export; "
            "copy it again from the export folder"
        )
    return path


def peak_rss_bytes() -> int:
    """The kernel's peak resident memory of this process so far (macOS reports bytes, Linux KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def verify(
    manifest_path: Path,
    tolerances: dict[str, float] | None = None,
    device: str = "auto",
    progress: ProgressFn = no_progress,
) -> VerifyOutcome:
    from evaluators.embedder import load_embedder
    from evaluators.reference import ReferencePack, evaluate
    from evaluators.verify import DEFAULT_TOLERANCES, compare_figures

    manifest = read_manifest(manifest_path)
    folder = Path(manifest_path).parent
    evaluation = manifest.get("evaluation")
    if not evaluation:
        raise SrcrError("this manifest has no evaluation figures (exported with --no-eval); re-export without it")
    artifact = _check_file(folder, manifest["artifact"], "artifact")
    reference = _check_file(folder, evaluation["reference_pack"], "reference pack")

    unknown = set(tolerances or {}) - set(DEFAULT_TOLERANCES)
    if unknown:
        raise SrcrError(
            f"unknown tolerance {sorted(unknown)[0]!r}; choose among: {', '.join(sorted(DEFAULT_TOLERANCES))}"
        )
    limits = {**DEFAULT_TOLERANCES, **(tolerances or {})}

    pack = ReferencePack.load(reference)
    runtime = get_target(manifest["format"]).open_runtime(artifact, device=device)
    try:
        measured = evaluate(runtime, pack, load_embedder(), progress)
        measured["runtime"] = runtime.info()
    finally:
        runtime.close()
    checks = compare_figures(evaluation, measured, limits)
    return VerifyOutcome(manifest=manifest, checks=checks, measured=measured, peak_rss_mb=peak_rss_bytes() / (1 << 20))
