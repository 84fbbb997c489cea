"""`srcr sweep`: every pruning × quantization combination, measured on the deployment format.

Pruning is the expensive step, so each distinct pruning setting is calibrated and pruned once and
reused for every bit-width; the dense model's reference outputs are computed once per sweep. Each
configuration's artifact and manifest land in the sweep folder as soon as it finishes, so a rerun
of the same command skips everything that is done and intact (sha256-checked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.atomic import remove_partials, write_json
from exporter.errors import SrcrError
from exporter.manifest import sha256_of
from exporter.pipeline import (
    EvalOptions,
    ExportOptions,
    OutputPaths,
    PrunedModel,
    StageTimer,
    clone_model,
    default_name,
    load_calibration_for,
    prune_spec_from,
    resolve_device,
    run_pruning,
    write_export,
)
from exporter.registry import get_target
from targets.base import ProgressFn, no_progress

INDEX_FILE = "index.json"
REFERENCE_FILE = "reference.npz"


@dataclass
class SweepOptions:
    model: str | None = None
    format: str = "gguf"
    sparsities: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5])
    patterns: list[str] = field(default_factory=list)
    bits: list[int] = field(default_factory=lambda: [2, 3, 4, 8])
    method: str = "sparsegpt"
    target_options: dict[str, Any] = field(default_factory=dict)
    calib: Path | None = None
    calib_samples: int | None = None
    seq_len: int | None = None
    seed: int = 0
    device: str = "auto"
    out: Path = Path("sweep")
    allow_pickle: bool = False
    evaluation: EvalOptions = field(default_factory=EvalOptions)


@dataclass(frozen=True)
class PruningSetting:
    sparsity: float
    pattern: str | None

    def export_options(self, options: SweepOptions) -> ExportOptions:
        return ExportOptions(
            model=options.model,
            format=options.format,
            method=options.method,
            sparsity=self.sparsity,
            pattern=self.pattern,
            calib=options.calib,
            calib_samples=options.calib_samples,
            seq_len=options.seq_len,
            seed=options.seed,
            device=options.device,
            allow_pickle=options.allow_pickle,
        )


def pruning_settings(options: SweepOptions) -> list[PruningSetting]:
    settings = [PruningSetting(sparsity, None) for sparsity in dict.fromkeys(options.sparsities)]
    settings += [PruningSetting(0.0, pattern) for pattern in dict.fromkeys(options.patterns)]
    if not settings:
        raise SrcrError("the sweep has no pruning setting; pass --sparsity 0,0.25 and/or --pattern 2:4")
    return settings


def _is_done(folder: Path, manifest_file: Path, reference_sha: str) -> bool:
    """A configuration counts as done only if its manifest, artifact and pack all check out."""
    if not manifest_file.is_file():
        return False
    try:
        manifest = json.loads(manifest_file.read_text())
        artifact = folder / manifest["artifact"]["file"]
        pack_sha = manifest["evaluation"]["reference_pack"]["sha256"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
    return pack_sha == reference_sha and artifact.is_file() and sha256_of(artifact) == manifest["artifact"]["sha256"]


def _sweep_identity(loaded: Any, options: SweepOptions) -> dict[str, Any]:
    """What must match for an existing sweep folder to be resumed rather than refused."""
    evaluation = options.evaluation
    return {
        "model_weights_sha256": loaded.weights_sha256,
        "format": options.format,
        "method": options.method,
        "calib": str(options.calib) if options.calib else None,
        "calib_samples": options.calib_samples,
        "seq_len": options.seq_len,
        "seed": options.seed,
        "eval_text": str(evaluation.eval_text) if evaluation.eval_text else None,
        "prompts": str(evaluation.prompts) if evaluation.prompts else None,
        "tasks": str(evaluation.tasks) if evaluation.tasks else None,
        "windows": evaluation.windows,
        "top_k": evaluation.top_k,
        "last_word_items": evaluation.last_word_items,
        "new_tokens": evaluation.new_tokens,
        "builtin_prompts": evaluation.builtin_prompts,
        "target_options": options.target_options,
    }


def _load_index(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        return {"identity": identity, "configurations": {}}
    index = json.loads(index_file.read_text())
    if index.get("identity") != identity:
        raise SrcrError(
            f"{folder} holds a sweep with other settings (model, format, calibration or evaluation); "
            "pass another --out to start a new sweep"
        )
    return index


def _reference_pack(loaded: Any, options: SweepOptions, folder: Path, device: str, progress: ProgressFn) -> Any:
    from evaluators.reference import ReferencePack
    from exporter.reference import build_reference

    path = folder / REFERENCE_FILE
    if path.is_file():
        return ReferencePack.load(path)
    pack = build_reference(loaded, options.evaluation, device, progress)
    pack.save(path)
    return pack


def run_sweep(options: SweepOptions, progress: ProgressFn = no_progress) -> list[dict[str, Any]]:
    """Run (or resume) the sweep; returns the manifests of every configuration, in sweep order."""
    from exporter.models import load_model

    if not options.evaluation.enabled:
        raise SrcrError("a sweep ranks configurations by Sr, so it always evaluates; drop --no-eval")
    target = get_target(options.format)
    specs = [target.resolve_quant(bits, None, **options.target_options) for bits in dict.fromkeys(options.bits)]
    settings = pruning_settings(options)
    prune_specs = {setting: prune_spec_from(setting.export_options(options)) for setting in settings}
    device = resolve_device(options.device)
    folder = Path(options.out)
    folder.mkdir(parents=True, exist_ok=True)
    remove_partials(folder)

    loaded = load_model(options.model, allow_pickle=options.allow_pickle)
    check_model = getattr(target, "check_model", None)
    for spec in specs if check_model is not None else []:
        check_model(loaded.model, spec)
    calibration = load_calibration_for(loaded, settings[0].export_options(options))
    identity = _sweep_identity(loaded, options)
    index = _load_index(folder, identity)
    pack = _reference_pack(loaded, options, folder, device, progress)
    reference_sha = sha256_of(folder / REFERENCE_FILE)

    plan = [
        (setting, spec, _paths(folder, default_name(loaded.source, prune_specs[setting], spec), target.suffix))
        for setting in settings
        for spec in specs
    ]
    total, finished = len(plan), 0
    manifests: dict[str, dict[str, Any]] = {}
    for setting in settings:
        todo = []
        for planned_setting, spec, paths in plan:
            if planned_setting != setting:
                continue
            if _is_done(folder, paths.manifest, reference_sha):
                manifests[paths.manifest.name] = json.loads(paths.manifest.read_text())
                finished += 1
                progress("sweep: skipping finished configurations", finished, total)
            else:
                todo.append((spec, paths))
        if not todo:
            continue
        timer = StageTimer()
        candidate = clone_model(loaded)
        with timer.stage("calibrate_prune"):
            report = run_pruning(candidate, calibration, prune_specs[setting], device, progress)
        pruned = PrunedModel(candidate, prune_specs[setting], report, calibration, options.seed)
        for spec, paths in todo:
            progress(f"sweep {paths.artifact.name}", finished, total)
            config_timer = StageTimer()
            config_timer.seconds = dict(timer.seconds)
            manifest = write_export(
                pruned, target, spec, paths, pack, device, config_timer, progress, overwrite=True, save_pack=False
            )
            manifests[paths.manifest.name] = manifest
            index["configurations"][manifest["name"]] = {
                "manifest": paths.manifest.name,
                "artifact_sha256": manifest["artifact"]["sha256"],
            }
            write_json(folder / INDEX_FILE, index, overwrite=True)
            finished += 1
            progress(f"sweep {paths.artifact.name}", finished, total)
        del candidate, pruned
    write_json(folder / INDEX_FILE, index, overwrite=True)
    return [manifests[paths.manifest.name] for _, _, paths in plan]


def _paths(folder: Path, name: str, suffix: str) -> OutputPaths:
    """A sweep's configurations share one reference pack in the sweep folder."""
    return OutputPaths(
        artifact=folder / f"{name}{suffix}",
        manifest=folder / f"{name}.manifest.json",
        reference=folder / REFERENCE_FILE,
    )


def sweep_records(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flat records the Pareto and report code work on."""
    records = []
    for manifest in manifests:
        pruning = manifest["pruning"]
        label = pruning["pattern"] or (f"{pruning['sparsity']:.0%}" if pruning["method"] else "dense")
        records.append(
            {
                "name": manifest["name"],
                "label": f"{label} {manifest['quantization']['type']}",
                "sparsity": pruning["sparsity"] if pruning["method"] else 0.0,
                "pattern": pruning["pattern"],
                "quant": manifest["quantization"]["type"],
                "bits": manifest["quantization"]["bits"],
                "bytes": manifest["artifact"]["bytes"],
                "bits_per_weight": manifest["artifact"]["bits_per_weight"],
                "tcr": manifest["compression"]["tcr"],
                "actual": manifest["compression"]["actual"],
                "sr": manifest.get("sr"),
                "srcr": manifest.get("srcr"),
                "retention": {  # None: undefined for this model (e.g. base accuracy 0)
                    key: value
                    for key, value in ((manifest.get("evaluation") or {}).get("retention") or {}).items()
                    if value is not None
                },
                "kld": ((manifest.get("evaluation") or {}).get("kld") or {}).get("mean"),
                "ppl": ((manifest.get("evaluation") or {}).get("perplexity") or {}).get("compressed"),
            }
        )
    return records


@dataclass
class SweepSummary:
    records: list[dict[str, Any]]
    front_tcr: set[str]
    front_bytes: set[str]
    recommended: dict[str, Any]
    sentence: str
    equal_tcr: list[dict[str, Any]]


def summarize(
    manifests: list[dict[str, Any]], budget_mb: float | None = None, min_retention: float | None = None
) -> SweepSummary:
    from exporter.pareto import equal_tcr_comparison, pareto_front, recommend, recommendation_sentence

    records = sweep_records(manifests)
    chosen = recommend(records, budget_mb, min_retention)
    return SweepSummary(
        records=records,
        front_tcr=pareto_front(records, "tcr"),
        front_bytes=pareto_front(records, "bytes", higher_is_better=False),
        recommended=chosen,
        sentence=recommendation_sentence(chosen, budget_mb, min_retention, records),
        equal_tcr=equal_tcr_comparison(records),
    )


def write_report(summary: SweepSummary, folder: Path, title: str) -> Path:
    from exporter.atomic import atomic_path
    from exporter.sweep_report import render_report

    page = render_report(
        summary.records,
        summary.front_tcr,
        summary.front_bytes,
        summary.recommended,
        summary.sentence,
        summary.equal_tcr,
        title,
    )
    path = Path(folder) / "report.html"
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
