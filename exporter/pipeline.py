"""`srcr export`: load → reference → calibrate+prune → convert+quantize → evaluate → manifest.

Each stage is a function of its own so that `srcr sweep` can reuse the expensive ones (the base
model's reference outputs once per sweep, pruning once per pruning setting).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.atomic import atomic_path, check_writable, dump_json
from exporter.compression import tcr
from exporter.errors import SrcrError
from exporter.models import LoadedModel, load_model
from exporter.registry import get_target
from targets.base import ProgressFn, QuantSpec, Target, no_progress


@dataclass
class EvalOptions:
    enabled: bool = True
    eval_text: Path | None = None
    prompts: Path | None = None
    tasks: Path | None = None
    windows: int | None = None
    top_k: int | None = None
    last_word_items: int | None = None
    new_tokens: int | None = None
    builtin_prompts: bool = True


@dataclass
class ExportOptions:
    model: str | None = None
    format: str = "gguf"
    bits: int | None = None
    quant_type: str | None = None
    target_options: dict[str, Any] = field(default_factory=dict)
    method: str = "sparsegpt"
    sparsity: float = 0.0
    pattern: str | None = None
    calib: Path | None = None
    calib_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    device: str = "auto"
    out: Path = Path("out")
    name: str | None = None
    overwrite: bool = False
    allow_pickle: bool = False
    evaluation: EvalOptions = field(default_factory=EvalOptions)


@dataclass(frozen=True)
class OutputPaths:
    artifact: Path
    manifest: Path
    reference: Path

    @classmethod
    def for_name(cls, out_dir: Path, name: str, suffix: str) -> OutputPaths:
        out_dir = Path(out_dir)
        return cls(
            artifact=out_dir / f"{name}{suffix}",
            manifest=out_dir / f"{name}.manifest.json",
            reference=out_dir / f"{name}.reference.npz",
        )

    def check(self, overwrite: bool, with_reference: bool) -> None:
        check_writable(self.artifact, overwrite)
        check_writable(self.manifest, overwrite)
        if with_reference:
            check_writable(self.reference, overwrite)


class StageTimer:
    """Wall time per pipeline stage, for the manifest; `current` names the stage in flight (for benchmarks)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.current: str | None = None

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start, outer = time.perf_counter(), self.current
        self.current = name
        try:
            yield
        finally:
            self.current = outer
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    def split(self, name: str, parts: dict[str, float]) -> None:
        """Replace stage `name` by the parts it reported; time outside them goes to the last part."""
        if not parts or name not in self.seconds:
            return
        total = self.seconds.pop(name)
        parts = dict(parts)
        last = list(parts)[-1]
        parts[last] += max(0.0, total - sum(parts.values()))
        for part, seconds in parts.items():
            self.seconds[part] = round(self.seconds.get(part, 0.0) + seconds, 3)


def resolve_device(device: str) -> str:
    import torch

    device = device.lower()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SrcrError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise SrcrError(f"unknown --device {device!r}; choose auto, cpu or cuda")
    return device


def prune_spec_from(options: ExportOptions) -> Any:
    from exporter.pruning import PruneSpec, parse_pattern
    from exporter.pruning.spec import validate_spec

    pattern = parse_pattern(options.pattern) if options.pattern else None
    if not 0.0 <= options.sparsity < 1.0:
        raise SrcrError(f"--sparsity {options.sparsity} is outside [0, 1); pass a fraction such as 0.25")
    if pattern and options.sparsity:
        raise SrcrError("pass either --sparsity (unstructured) or --pattern N:M, not both")
    spec = PruneSpec(method=options.method, sparsity=options.sparsity, pattern=pattern)
    validate_spec(spec)  # before the model is even loaded
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", Path(text).name.lower()).strip("-") or "model"


def default_name(source: str, prune_spec: Any, spec: QuantSpec) -> str:
    if prune_spec.pattern:
        pruning = f"{prune_spec.method}-{prune_spec.pattern[0]}of{prune_spec.pattern[1]}"
    elif prune_spec.sparsity > 0:
        pruning = f"{prune_spec.method}-s{round(prune_spec.sparsity * 100):02d}"
    else:
        pruning = "dense"
    return f"{_slug(source)}-{pruning}-{_slug(spec.quant_type)}"


def is_pruning(prune_spec: Any) -> bool:
    return bool(prune_spec.pattern) or prune_spec.sparsity > 0


def load_calibration_for(loaded: LoadedModel, options: ExportOptions) -> Any:
    """Tokenize the calibration text up front, so a too-short file fails before any expensive stage."""
    from exporter.calibration import load_calibration

    return load_calibration(loaded.tokenizer, options.calib, options.calib_samples, options.seq_len, options.seed)


def run_pruning(loaded: LoadedModel, calibration: Any, prune_spec: Any, device: str, progress: ProgressFn) -> Any:
    """Calibrate and prune `loaded.model` in place; returns the PruneReport."""
    from exporter.pruning import prune_model

    return prune_model(loaded.model, calibration.input_ids, prune_spec, device=device, progress=progress)


def pruning_section(prune_spec: Any, report: Any, calibration: Any, seed: int) -> dict[str, Any]:
    pattern = f"{prune_spec.pattern[0]}:{prune_spec.pattern[1]}" if prune_spec.pattern else None
    return {
        "method": prune_spec.method if is_pruning(prune_spec) else None,
        "sparsity": prune_spec.target_sparsity,
        "pattern": pattern,
        "achieved_sparsity": report.overall_sparsity,
        "per_layer": report.per_layer,
        "calibration": calibration.describe(),
        "imatrix_tokens": report.imatrix_tokens,
        "seed": seed,
    }


def sparsity_for_tcr(prune_spec: Any) -> float:
    return prune_spec.target_sparsity if is_pruning(prune_spec) else 0.0


def run_export(
    options: ExportOptions, progress: ProgressFn = no_progress, timer: StageTimer | None = None
) -> dict[str, Any]:
    """The whole export; returns the manifest that was written beside the artifact."""
    from exporter.reference import build_reference

    target = get_target(options.format)
    spec = target.resolve_quant(options.bits, options.quant_type, **options.target_options)
    prune_spec = prune_spec_from(options)
    device = resolve_device(options.device)
    evaluation = options.evaluation

    timer = timer or StageTimer()
    with timer.stage("load"):
        progress("load model", 0, 1)
        loaded = load_model(options.model, allow_pickle=options.allow_pickle)
        progress("load model", 1, 1)
    check_model = getattr(target, "check_model", None)  # format limits that depend on the model's shapes
    if check_model is not None:
        check_model(loaded.model, spec)
    name = options.name or default_name(loaded.source, prune_spec, spec)
    paths = OutputPaths.for_name(options.out, name, target.suffix)
    paths.check(options.overwrite, with_reference=evaluation.enabled)
    Path(options.out).mkdir(parents=True, exist_ok=True)

    calibration = load_calibration_for(loaded, options)

    pack = None
    if evaluation.enabled:
        with timer.stage("reference"):
            pack = build_reference(loaded, evaluation, device, progress)

    with timer.stage("calibrate_prune"):
        report = run_pruning(loaded, calibration, prune_spec, device, progress)

    pruned = PrunedModel(loaded, prune_spec, report, calibration, options.seed)
    return write_export(pruned, target, spec, paths, pack, device, timer, progress, options.overwrite)


@dataclass
class PrunedModel:
    """A model after calibration and pruning, with what the manifest needs to say about it."""

    loaded: LoadedModel
    prune_spec: Any
    report: Any  # PruneReport
    calibration: Any  # CalibrationSet
    seed: int


def write_export(
    pruned: PrunedModel,
    target: Target,
    spec: QuantSpec,
    paths: OutputPaths,
    pack: Any,
    device: str,
    timer: StageTimer,
    progress: ProgressFn,
    overwrite: bool = False,
    save_pack: bool = True,
) -> dict[str, Any]:
    """Convert + quantize, evaluate, and write artifact, reference pack and manifest together.

    Everything is written under temporary names and renamed at the end (manifest first, artifact
    last), so an interrupted or failed export leaves nothing behind under the final names. With
    `save_pack=False` the pack already lies at `paths.reference` (a sweep shares one).
    """
    from exporter.manifest import build_manifest, evaluation_section
    from exporter.reference import evaluate_artifact

    loaded = pruned.loaded
    with contextlib.ExitStack() as outputs:
        artifact_tmp = outputs.enter_context(atomic_path(paths.artifact, overwrite))
        with timer.stage("export"):
            result = target.export(
                loaded.model,
                loaded.tokenizer,
                spec,
                artifact_tmp,
                imatrix=pruned.report.imatrix,
                hints=loaded.hints,
                progress=progress,
            )
        timer.split("export", result.stage_seconds)
        figures, reference_file = None, None
        if pack is not None:
            with timer.stage("evaluate"):
                figures = evaluate_artifact(target, artifact_tmp, pack, progress)
            reference_file = paths.reference
            if save_pack:
                reference_file = outputs.enter_context(atomic_path(paths.reference, overwrite))
                pack.save(reference_file, overwrite=True)  # onto our own temporary name
        result.artifact = paths.artifact
        manifest = build_manifest(
            name=paths.artifact.name.removesuffix(target.suffix),
            loaded=loaded,
            spec=spec,
            result=result,
            artifact_file=artifact_tmp,
            pruning=pruning_section(pruned.prune_spec, pruned.report, pruned.calibration, pruned.seed),
            tcr_value=tcr(sparsity_for_tcr(pruned.prune_spec), spec.bits),
            evaluation=evaluation_section(figures, pack, paths.reference),
            device=device,
            timings=dict(timer.seconds),
            reference_file=reference_file,
        )
        dump_json(outputs.enter_context(atomic_path(paths.manifest, overwrite)), manifest)
    return manifest


def clone_model(loaded: LoadedModel) -> LoadedModel:
    """A deep copy to prune, leaving the dense model intact for the next setting of a sweep."""
    return dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
