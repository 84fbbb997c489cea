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

from srcr.base.errors import SrcrError
from srcr.base.files import sha256_of, write_json
from srcr.base.progress import ProgressFn, no_progress
from srcr.evaluators.reference import ReferencePack
from srcr.evaluators.uncertainty import ItemScores
from srcr.exporter.manifest import Manifest, item_scores, read_manifest
from srcr.exporter.pipeline import (
    OutputPaths,
    Plan,
    Setting,
    StageTimer,
    calibration_stage,
    default_name,
    job_recipe,
    load_stage,
    make_plan,
    prune_spec_for,
    prune_stage,
    reference_stage,
    setting_for,
    workspace,
    write_export,
)
from srcr.exporter.recipe import Recipe, SweepStage

INDEX_FILE = "index.json"
REFERENCE_FILE = "reference.npz"
LOCK_NAME = "sweep"


def sweep_axes(recipe: Recipe) -> SweepStage:
    """The recipe's axes; a recipe without [sweep] sweeps the default axes."""
    return recipe.sweep if recipe.sweep is not None else SweepStage()


def sweep_settings(recipe: Recipe) -> list[Setting]:
    axes = sweep_axes(recipe)
    unstructured = [(sparsity, None) for sparsity in dict.fromkeys(axes.sparsity)]
    unstructured += [(0.0, pattern) for pattern in dict.fromkeys(axes.pattern)]
    if not unstructured or not axes.structures:
        raise SrcrError("the sweep has no pruning setting; pass --sparsity 0,0.25 and/or --pattern 2:4")
    specs = [prune_spec_for(sparsity, pattern, recipe.prune) for sparsity, pattern in unstructured]
    structures = [structure.spec() for structure in dict.fromkeys(axes.structures)]
    settings = [Setting(spec, structure) for structure in structures for spec in specs]
    # Settings that leave the weights alone first: they run on the dense model, which later settings may consume.
    return sorted(settings, key=lambda setting: setting.changes_weights)


def _is_done(folder: Path, manifest_file: Path, reference_sha: str) -> Manifest | None:
    """A configuration's manifest if it is done: manifest valid, artifact and pack as recorded."""
    if not manifest_file.is_file():
        return None
    try:
        manifest = read_manifest(manifest_file)
    except SrcrError:
        return None
    evaluation = manifest.evaluation
    artifact = folder / manifest.artifact.file
    if evaluation is None or evaluation.reference_pack.sha256 != reference_sha or not artifact.is_file():
        return None
    return manifest if sha256_of(artifact) == manifest.artifact.sha256 else None


def _sweep_identity(plan: Plan) -> dict[str, Any]:
    """What must match for an existing sweep folder to be resumed rather than refused."""
    recipe = plan.recipe
    evaluation, prune = recipe.evaluate, recipe.prune
    # A recipe's single quantizer is each quantization's unless an axis names others; the per-axis quantizer
    # is in each configuration's name, so only the common options identify the sweep.
    target_options = {key: value for key, value in recipe.quantize.target_options().items() if key != "quantizer"}
    identity = {
        "model_weights_sha256": plan.source.weights_sha256,
        "format": recipe.export.format,
        "method": prune.method,
        "percdamp": prune.percdamp,
        "prune_block_size": prune.block_size,
        "calib_sha256": plan.calibration_text.sha256,
        "calib_samples": plan.calib_samples,
        "seq_len": plan.seq_len,
        "seed": plan.seed,
        "eval_text_sha256": plan.evaluation.text.sha256 if plan.evaluation else None,
        "prompts": evaluation.prompts,
        "tasks": evaluation.tasks,
        "windows": evaluation.windows,
        "top_k": evaluation.top_k,
        "last_word_items": evaluation.last_word_items,
        "new_tokens": evaluation.new_tokens,
        "builtin_prompts": evaluation.builtin_prompts,
        "target_options": target_options,
    }
    if plan.reference != "torch":  # only then: sweep folders of earlier versions keep resuming
        identity["reference"] = plan.reference
    if evaluation.lm_eval_tasks:  # only then: sweep folders of earlier versions keep resuming
        identity["lm_eval"] = {
            "tasks": list(evaluation.lm_eval_tasks),
            "include": str(evaluation.lm_eval_include) if evaluation.lm_eval_include else None,
            "limit": evaluation.lm_eval_limit,
        }
    return identity


def _load_index(folder: Path, identity: dict[str, Any]) -> dict[str, Any]:
    index_file = folder / INDEX_FILE
    if not index_file.is_file():
        return {"identity": identity, "configurations": {}}
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise SrcrError(
            f"{index_file} is damaged; remove it (finished configurations are re-checked) or pass another --out"
        ) from None
    if not isinstance(index, dict) or index.get("identity") != identity:
        raise SrcrError(
            f"{folder} holds a sweep with other settings (model, format, calibration or evaluation); "
            "pass another --out to start a new sweep"
        )
    return index


def _reference_pack(plan: Plan, loaded: Any, folder: Path, timer: StageTimer, progress: ProgressFn) -> ReferencePack:
    path = folder / REFERENCE_FILE
    if path.is_file():
        return ReferencePack.load(path)
    pack = reference_stage(plan, loaded, folder, timer, progress)
    pack.save(path)
    return pack


def _paths(folder: Path, name: str, suffix: str) -> OutputPaths:
    """A sweep's configurations share one reference pack in the sweep folder."""
    return OutputPaths(
        artifact=folder / f"{name}{suffix}",
        manifest=folder / f"{name}.manifest.json",
        reference=folder / REFERENCE_FILE,
    )


def run_sweep(
    recipe: Recipe, out: Path = Path("sweep"), *, allow_pickle: bool = False, progress: ProgressFn = no_progress
) -> list[Manifest]:
    """Run (or resume) the sweep the recipe's axes describe; returns the manifests of every configuration,
    in sweep order. Each manifest embeds its own configuration's recipe, which `srcr export` replays."""
    if not recipe.evaluate.enabled:
        raise SrcrError("a sweep ranks configurations by Sr, so it always evaluates; drop --no-eval")
    axes = sweep_axes(recipe)
    if not axes.bits and not axes.quant_type:
        raise SrcrError("--bits is empty; pass the bit-widths to try, e.g. --bits 2,3,4,8, or --quant-type")
    bits, quantizers = list(dict.fromkeys(axes.bits)), list(dict.fromkeys(axes.quantizer)) or [None]
    quant_types = list(dict.fromkeys(axes.quant_type))
    plan = make_plan(recipe, out, allow_pickle, bits, None, sweep_settings(recipe), quantizers, quant_types)
    with workspace(out, LOCK_NAME, f"the sweep folder {out}") as folder:
        return _run(plan, folder, progress)


def _run(plan: Plan, folder: Path, progress: ProgressFn) -> list[Manifest]:
    identity = _sweep_identity(plan)
    index = _load_index(folder, identity)
    plan_rows = [
        (setting_for(setting, spec), spec, default_name(plan.source.label, setting_for(setting, spec), spec), setting)
        for setting in plan.settings
        for spec in plan.specs
    ]
    plan_rows = [
        (setting, spec, _paths(folder, name, plan.target.suffix), job_recipe(plan, fitted, spec, name))
        for setting, spec, name, fitted in plan_rows
    ]
    shared = StageTimer()
    dense = load_stage(plan, shared, progress)
    pack = _reference_pack(plan, dense, folder, shared, progress)
    reference_sha = sha256_of(folder / REFERENCE_FILE)
    calibration = calibration_stage(plan, dense)

    total, finished = len(plan_rows), 0
    manifests: dict[Path, Manifest] = {}
    todo: dict[Setting, list[tuple[Any, OutputPaths, Recipe]]] = {setting: [] for setting, *_ in plan_rows}
    for setting, spec, paths, recipe in plan_rows:
        done = _is_done(folder, paths.manifest, reference_sha)
        if done is not None:
            manifests[paths.manifest] = done
            finished += 1
            progress("sweep: skipping finished configurations", finished, total)
        else:
            todo[setting].append((spec, paths, recipe))
    with_work = [setting for setting in todo if todo[setting]]
    # One copy of the model at a time: the first setting that changes weights prunes the dense model itself
    # (the reference pack is made), every later one a fresh copy read once the previous one is gone.
    # Streamed, no setting holds a copy: each reads the layers from the source folder.
    for setting in with_work:
        timer = StageTimer()
        model = dense if dense is not None else load_stage(plan, timer, progress)
        if model.weights is None and setting.changes_weights:
            dense = None  # pruned in place below: what is left is no longer the dense model
        with prune_stage(plan, model, setting, calibration, folder, timer, progress, reuse_dense=True) as pruned:
            for spec, paths, recipe in todo[setting]:
                progress(f"sweep {paths.artifact.name}", finished, total)
                config_timer = StageTimer()
                config_timer.seconds = dict(timer.seconds)
                manifest = write_export(
                    pruned, plan, spec, paths, pack, config_timer, progress, recipe, overwrite=True, save_pack=False
                )
                manifests[paths.manifest] = manifest
                index["configurations"][manifest.name] = {
                    "manifest": paths.manifest.name,
                    "artifact_sha256": manifest.artifact.sha256,
                }
                write_json(folder / INDEX_FILE, index, overwrite=True)
                finished += 1
                progress(f"sweep {paths.artifact.name}", finished, total)
        del pruned, model
    write_json(folder / INDEX_FILE, index, overwrite=True)
    return [manifests[paths.manifest] for _, _, paths, _ in plan_rows]


def sweep_records(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """The flat records the Pareto and report code work on."""
    records = []
    for manifest in manifests:
        pruning, evaluation = manifest.pruning, manifest.evaluation
        label = pruning.pattern or (f"{pruning.sparsity:.0%}" if pruning.method else "dense")
        structure = pruning.structure
        if structure is not None:
            label = f"-{structure.removed_fraction:.0%} params, {label}"
        records.append(
            {
                "name": manifest.name,
                "label": f"{label} {manifest.quantization.type}",
                "sparsity": pruning.sparsity if pruning.method else 0.0,
                "removed": structure.removed_fraction if structure is not None else 0.0,
                "pattern": pruning.pattern,
                "quant": manifest.quantization.type,
                "bits": manifest.quantization.bits,
                "bytes": manifest.artifact.bytes,
                "bits_per_weight": manifest.artifact.bits_per_weight,
                "tcr": manifest.compression.tcr,
                "actual": manifest.compression.actual,
                "sr": manifest.sr,
                "srcr": manifest.srcr,
                # None: undefined for this model (e.g. base accuracy at chance)
                "retention": {
                    key: value
                    for key, value in (evaluation.retention if evaluation else {}).items()
                    if value is not None
                },
                "kld": evaluation.kld.mean if evaluation else None,
                "tok_s": evaluation.speed.prompt_tokens_per_s if evaluation else None,
                "ppl": evaluation.perplexity.compressed if evaluation else None,
                "sr_interval": evaluation.intervals.get("sr") if evaluation and evaluation.intervals else None,
                "pack": evaluation.reference_pack.sha256 if evaluation else None,
            }
        )
    return records


def sweep_items(manifests: list[Manifest]) -> dict[str, ItemScores]:
    """Per-item scores by configuration name, for paired differences (manifests that carry them)."""
    scored = {manifest.name: item_scores(manifest) for manifest in manifests}
    return {name: items for name, items in scored.items() if items is not None}


@dataclass
class SweepSummary:
    records: list[dict[str, Any]]
    front_tcr: set[str]
    front_bytes: set[str]
    recommended: dict[str, Any]
    sentence: str
    equal_tcr: list[dict[str, Any]]
    tie: dict[str, Any] | None = None  # the rival the recommendation could not be told apart from
    # Sr against prompt tokens/s measured in the runtime (meaningful on an idle machine only)
    front_speed: set[str] = field(default_factory=set)


def summarize(
    manifests: list[Manifest], budget_mb: float | None = None, min_retention: float | None = None
) -> SweepSummary:
    from srcr.exporter.pareto import break_tie, equal_tcr_comparison, pareto_front, recommend, recommendation_sentence

    records = sweep_records(manifests)
    items = sweep_items(manifests)
    chosen = recommend(records, budget_mb, min_retention)
    tie = None
    if min_retention is None:  # that pick maximizes TCr, which has no noise
        candidates = records if budget_mb is None else [r for r in records if r["bytes"] <= budget_mb * 1e6]
        chosen, tie = break_tie(chosen, candidates, items, "sr" if budget_mb is not None else "srcr")
    return SweepSummary(
        records=records,
        front_tcr=pareto_front(records, "tcr"),
        front_bytes=pareto_front(records, "bytes", higher_is_better=False),
        front_speed=pareto_front([record for record in records if record["tok_s"]], "tok_s"),
        recommended=chosen,
        sentence=recommendation_sentence(chosen, budget_mb, min_retention, records, tie),
        equal_tcr=equal_tcr_comparison(records, items=items),
        tie=tie,
    )


def write_report(summary: SweepSummary, folder: Path, title: str) -> Path:
    from srcr.base.files import atomic_path
    from srcr.exporter.sweep_report import render_report

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
