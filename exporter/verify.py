"""`srcr verify`: on the device, with only the artifact, its manifest and its reference pack.

Checks that the files are the ones exported (sha256), re-runs the evaluators through the
deployment runtime, and compares every figure with the manifest within tolerances. Every file it
reads is untrusted: the manifest is validated against its schema, file names in it must stay
beside it, and the pack and artifact are checked before a runtime sees them.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError
from srcr.base.files import contained_file, sha256_of
from srcr.base.progress import ProgressFn, no_progress
from srcr.evaluators.tolerances import FigureCheck
from srcr.exporter.manifest import Manifest, read_manifest
from srcr.targets.registry import get_target


@dataclass
class VerifyOutcome:
    manifest: Manifest
    checks: list[FigureCheck]
    measured: dict[str, Any]
    peak_rss_mb: float

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)


def _check_file(folder: Path, name: str, sha256: str, what: str) -> Path:
    path = contained_file(folder, name, what)
    if not path.is_file():
        raise SrcrError(f"{what} {path} is missing; copy it next to the manifest")
    if sha256_of(path) != sha256:
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
    mode: str = "drift",
) -> VerifyOutcome:
    from srcr.evaluators.embedder import load_embedder
    from srcr.evaluators.reference import ReferencePack, evaluate
    from srcr.evaluators.tolerances import DEFAULT_TOLERANCES, MODES, TASK_TOLERANCE, compare_figures

    if mode not in MODES:
        raise SrcrError(f"unknown --tolerance-mode {mode!r}; choose {' or '.join(MODES)}")

    manifest = read_manifest(manifest_path)
    # Each lm-eval task of the manifest is checked like a multiple-choice accuracy.
    tasks = manifest.evaluation.harness if manifest.evaluation is not None else None
    known = {**DEFAULT_TOLERANCES, **{f"harness.{name}.acc": TASK_TOLERANCE for name in tasks or {}}}
    unknown = set(tolerances or {}) - set(known)
    if unknown:
        raise SrcrError(f"unknown tolerance {sorted(unknown)[0]!r}; choose among: {', '.join(sorted(known))}")
    limits = {**known, **(tolerances or {})}
    folder = Path(manifest_path).parent
    evaluation = manifest.evaluation
    if evaluation is None:
        raise SrcrError("this manifest has no evaluation figures (exported with --no-eval); re-export without it")
    if mode == "interval" and not evaluation.intervals:
        raise SrcrError("this manifest has no intervals (an older srcr wrote it); use --tolerance-mode drift")
    target = get_target(manifest.format)
    artifact = _check_file(folder, manifest.artifact.file, manifest.artifact.sha256, "artifact")
    pack_entry = evaluation.reference_pack
    reference = _check_file(folder, pack_entry.file, pack_entry.sha256, "reference pack")

    pack = ReferencePack.load(reference)
    runtime = target.open_runtime(artifact, device=device)
    try:
        measured = evaluate(runtime, pack, load_embedder(), progress)
        measured["runtime"] = runtime.info()
    finally:
        runtime.close()
    intervals = evaluation.intervals if mode == "interval" else None
    checks = compare_figures(evaluation.model_dump(mode="json"), measured, limits, intervals)
    return VerifyOutcome(manifest=manifest, checks=checks, measured=measured, peak_rss_mb=peak_rss_bytes() / (1 << 20))
