"""`srcr sweep`: every pruning × quantization combination, measured on the deployment format.

Pruning is the expensive step, so each distinct pruning setting is calibrated and pruned once and
reused for every bit-width; the dense model's reference outputs are computed once per sweep. Each
configuration's artifact and manifest land in the sweep folder as soon as it finishes, so a rerun
of the same command skips everything that is done and intact (sha256-checked).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError
from srcr.base.files import remove_stale_partials, sha256_of, write_json
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
from srcr.exporter.stage_cache import StageCache, default_cache_root, restore, stage_key
from srcr.targets.base import QuantSpec

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


def _reference_pack(
    plan: Plan, loaded: Any, folder: Path, timer: StageTimer, progress: ProgressFn, cache: StageCache | None
) -> ReferencePack:
    """The sweep folder's pack, else the cache's for the same model and evaluation, else a new one (cached)."""
    path = folder / REFERENCE_FILE
    if path.is_file():
        return ReferencePack.load(path)
    key = stage_key("reference", _reference_inputs(plan)) if cache is not None else None
    cached = cache.get("reference", key) if cache is not None else None
    if cached is not None and REFERENCE_FILE in cached:
        restore(cached[REFERENCE_FILE], path)
        return ReferencePack.load(path)
    pack = reference_stage(plan, loaded, folder, timer, progress)
    pack.save(path)
    if cache is not None:
        cache.put("reference", key, {REFERENCE_FILE: path})
    return pack


def _reference_inputs(plan: Plan) -> dict[str, Any]:
    """What the dense model's reference pack depends on: the weights, every evaluation input, where it ran."""
    inputs = plan.evaluation
    return {
        "weights": plan.source.weights_sha256,
        "settings": dataclasses.asdict(inputs.settings),
        "text": inputs.text.sha256,
        "prompts": inputs.prompts,
        "tasks": inputs.tasks,
        "harness": repr(inputs.harness),
        "reference": plan.reference,
        "device": plan.device,
    }


def _artifact_key(recipe: Recipe, reference_sha: str) -> str:
    """A configuration's entry: its resolved recipe less the paths that the digests cover (the weights',
    the calibration text's, and the reference pack's, which holds the evaluation's inputs)."""
    data = recipe.model_dump()
    data["model"].pop("source")
    data["calibration"].pop("text")
    for key in ("text", "prompts", "tasks", "lm_eval_include"):
        data["evaluate"].pop(key)
    # torch's thread count orders SparseGPT's sums: a pass on 1 thread is not the pass on 2 (docs/sweep.md).
    return stage_key("artifact", {"recipe": data, "reference_pack": reference_sha, "torch_threads": _threads()})


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _paths(folder: Path, name: str, suffix: str) -> OutputPaths:
    """A sweep's configurations share one reference pack in the sweep folder."""
    return OutputPaths(
        artifact=folder / f"{name}{suffix}",
        manifest=folder / f"{name}.manifest.json",
        reference=folder / REFERENCE_FILE,
    )


EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class RunOptions:
    """How a sweep runs, not what it computes: by default none of these changes a file it writes."""

    executor: str = "local"  # local: one configuration after another in this process; ray: tasks on a cluster
    ray_address: str | None = None  # None: a Ray cluster of this machine's cores, started for the sweep
    cache: Path | None = field(default_factory=default_cache_root)  # None: --no-cache
    # A Ray task's CPUs and torch threads. None: as many as torch uses here, so a task sums SparseGPT's
    # products in the order a local run does and writes the same bytes. Fewer pack more tasks on a node,
    # and their files are those of a run with that many threads (the one option that changes them).
    task_cpus: int | None = None


def sweep_plan(recipe: Recipe, out: Path, allow_pickle: bool) -> Plan:
    """The sweep's plan: every input checked, no weight read (a Ray task makes it again, as cheaply)."""
    axes = sweep_axes(recipe)
    if recipe.quantize.budget_bpw is not None:
        raise SrcrError(
            "a sweep compares its budget files at equal bytes, and at equal bits per weight a cut model's file is "
            "smaller; use --allocate-mb (quantize.budget_mb) instead of quantize.budget_bpw"
        )
    if recipe.quantize.budget_mb is not None:
        return _allocating_plan(recipe, out, allow_pickle, axes)
    if not axes.bits and not axes.quant_type:
        raise SrcrError("--bits is empty; pass the bit-widths to try, e.g. --bits 2,3,4,8, or --quant-type")
    bits, quantizers = list(dict.fromkeys(axes.bits)), list(dict.fromkeys(axes.quantizer)) or [None]
    quant_types = list(dict.fromkeys(axes.quant_type))
    return make_plan(recipe, out, allow_pickle, bits, None, sweep_settings(recipe), quantizers, quant_types)


def _allocating_plan(recipe: Recipe, out: Path, allow_pickle: bool, axes: SweepStage) -> Plan:
    """--allocate-mb: one file of that size per pruning setting, its types chosen per tensor as
    `srcr export --budget-mb` chooses them, so that settings (structured cuts above all) compete at equal bytes."""
    if axes.bits or axes.quant_type:
        raise SrcrError(
            "--allocate-mb gives every pruning setting one file of that size, its types chosen per tensor; drop "
            "--bits and --quant-type (in a recipe: sweep.bits = [] and sweep.quant_type = [])"
        )
    quantizers = list(dict.fromkeys(axes.quantizer)) or [None]
    if len(quantizers) > 1:
        raise SrcrError(
            f"--allocate-mb takes one quantizer, not {', '.join(map(str, quantizers))}: run one sweep per "
            "quantizer into its own --out"
        )
    return make_plan(recipe, out, allow_pickle, [None], None, sweep_settings(recipe), quantizers)


def recommendation_budget(recipe: Recipe) -> float | None:
    """The MB a sweep recommends within: its --budget-mb, else the size --allocate-mb gave every file."""
    axes = sweep_axes(recipe)
    return axes.budget_mb if axes.budget_mb is not None else recipe.quantize.budget_mb


def run_sweep(
    recipe: Recipe,
    out: Path = Path("sweep"),
    *,
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
    run: RunOptions | None = None,
) -> list[Manifest]:
    """Run (or resume) the sweep the recipe's axes describe; returns the manifests of every configuration,
    in sweep order. Each manifest embeds its own configuration's recipe, which `srcr export` replays."""
    run = run or RunOptions()
    if not recipe.evaluate.enabled:
        raise SrcrError("a sweep ranks configurations by Sr, so it always evaluates; drop --no-eval")
    if run.executor not in EXECUTORS:
        raise SrcrError(f"unknown --executor {run.executor!r}; choose {' or '.join(EXECUTORS)}")
    if run.executor == "ray":
        from srcr.exporter.distributed import require_ray

        require_ray()  # before any work
    plan = sweep_plan(recipe, out, allow_pickle)
    with workspace(out, LOCK_NAME, f"the sweep folder {out}") as folder:
        return _run(plan, folder, progress, run, allow_pickle)


@dataclass(frozen=True)
class Row:
    """One configuration: the pruning pass it needs, its quantization, its files and its resolved recipe."""

    setting: Setting
    spec: QuantSpec
    paths: OutputPaths
    recipe: Recipe


def sweep_rows(plan: Plan, folder: Path) -> list[Row]:
    rows = []
    for fitted in plan.settings:
        for spec in plan.specs:
            setting = setting_for(fitted, spec)
            name = default_name(plan.source.label, setting, spec)
            paths = _paths(folder, name, plan.target.suffix)
            rows.append(Row(setting, spec, paths, job_recipe(plan, fitted, spec, name)))
    return rows


def _run(plan: Plan, folder: Path, progress: ProgressFn, run: RunOptions, allow_pickle: bool) -> list[Manifest]:
    identity = _sweep_identity(plan)
    index = _load_index(folder, identity)
    cache = StageCache(run.cache) if run.cache is not None else None
    rows = sweep_rows(plan, folder)
    shared = StageTimer()
    dense = load_stage(plan, shared, progress)
    pack = _reference_pack(plan, dense, folder, shared, progress, cache)
    reference_sha = sha256_of(folder / REFERENCE_FILE)

    total = len(rows)
    manifests: dict[Path, Manifest] = {}
    todo: dict[Setting, list[Row]] = {row.setting: [] for row in rows}
    for row in rows:
        done = _is_done(folder, row.paths.manifest, reference_sha) or _from_cache(cache, row, folder, reference_sha)
        if done is not None:
            manifests[row.paths.manifest] = done
            progress("sweep: skipping finished configurations", len(manifests), total)
        else:
            todo[row.setting].append(row)
    with_work = {setting: rows for setting, rows in todo.items() if rows}

    def finished(row: Row, manifest: Manifest) -> None:
        manifests[row.paths.manifest] = manifest
        index["configurations"][manifest.name] = {
            "manifest": row.paths.manifest.name,
            "artifact_sha256": manifest.artifact.sha256,
        }
        write_json(folder / INDEX_FILE, index, overwrite=True)
        if cache is not None:
            cache.put("artifact", _artifact_key(row.recipe, reference_sha), _entry_files(row.paths))
        progress(f"sweep {row.paths.artifact.name}", len(manifests), total)

    if run.executor == "ray" and with_work:
        from srcr.exporter.distributed import run_on_ray

        del dense  # the workers load their own
        groups = list(with_work.values())
        run_on_ray(plan, folder, groups, allow_pickle, run.ray_address, run.cache, finished, progress, run.task_cpus)
        remove_stale_partials(folder)  # what workers that died mid-task left
    else:
        _run_here(plan, folder, with_work, dense, pack, progress, finished, cache)
    write_json(folder / INDEX_FILE, index, overwrite=True)
    return [manifests[row.paths.manifest] for row in rows]


def _run_here(
    plan: Plan,
    folder: Path,
    with_work: dict[Setting, list[Row]],
    dense: Any,
    pack: ReferencePack,
    progress: ProgressFn,
    finished: Any,
    cache: StageCache | None,
) -> None:
    """The local executor: each pruning setting once, in this process, every quantization of it after it."""
    calibration = calibration_stage(plan, dense)
    # One copy of the model at a time: the first setting that changes weights prunes the dense model itself
    # (the reference pack is made), every later one a fresh copy read once the previous one is gone.
    # Streamed, no setting holds a copy: each reads the layers from the source folder.
    for setting, rows in with_work.items():
        timer = StageTimer()

        def model_to_prune(setting: Setting = setting, timer: StageTimer = timer) -> Any:
            nonlocal dense
            model = dense if dense is not None else load_stage(plan, timer, progress)
            if model.weights is None and setting.changes_weights:
                dense = None  # pruned in place: what is left is no longer the dense model
            return model

        run_setting(plan, model_to_prune, setting, rows, calibration, pack, folder, timer, progress, finished, cache)


def run_setting(
    plan: Plan,
    model_to_prune: Any,
    setting: Setting,
    rows: list[Row],
    calibration: Any,
    pack: ReferencePack,
    folder: Path,
    timer: StageTimer,
    progress: ProgressFn,
    finished: Any,
    cache: StageCache | None,
) -> None:
    """One pruning pass (or its cache entry) and every configuration that shares it: the unit of work of
    either executor. `model_to_prune()` gives the model the pass may consume, asked for only when needed."""
    with pruned_setting(plan, model_to_prune, setting, calibration, folder, timer, progress, cache) as pruned:
        for row in rows:
            progress(f"sweep {row.paths.artifact.name}", 0, 1)
            config_timer = StageTimer()
            config_timer.seconds = dict(timer.seconds)
            manifest = write_export(
                pruned, plan, row.spec, row.paths, pack, config_timer, progress, row.recipe, overwrite=True,
                save_pack=False,
            )  # fmt: skip
            finished(row, manifest)


@contextlib.contextmanager
def pruned_setting(
    plan: Plan,
    model_to_prune: Any,
    setting: Setting,
    calibration: Any,
    folder: Path,
    timer: StageTimer,
    progress: ProgressFn,
    cache: StageCache | None,
) -> Iterator[Any]:
    """The setting's pruning pass, read from the stage cache when it holds it, else run and stored."""
    from srcr.exporter.pruned_cache import KIND, cacheable, load_pruned, pruned_key, save_pruned

    key = pruned_key(plan, setting, calibration) if cache is not None and cacheable(plan, setting) else None
    files = cache.get(KIND, key) if key is not None else None
    if files is not None:
        with timer.stage("calibrate_prune"):
            progress("calibrate+prune: from the stage cache", 1, 1)
            dense = None if setting.changes_weights else model_to_prune()
            pruned = load_pruned(plan, files, setting, calibration, dense)
        yield pruned
        return
    with prune_stage(plan, model_to_prune(), setting, calibration, folder, timer, progress, reuse_dense=True) as pruned:
        if key is not None:
            save_pruned(cache, key, pruned, folder)
        yield pruned


def _entry_files(paths: OutputPaths) -> dict[str, Path]:
    files = {paths.artifact.name: paths.artifact, paths.manifest.name: paths.manifest}
    data = paths.artifact.with_name(f"{paths.artifact.name}.data")  # ONNX's weights past 2 GB
    if data.is_file():
        files[data.name] = data
    return files


def _from_cache(cache: StageCache | None, row: Row, folder: Path, reference_sha: str) -> Manifest | None:
    """A configuration from the stage cache, put into the sweep folder; None when the cache has none."""
    if cache is None:
        return None
    files = cache.get("artifact", _artifact_key(row.recipe, reference_sha))
    if files is None or set(files) - {*_entry_files(row.paths), f"{row.paths.artifact.name}.data"}:
        return None
    for name, path in files.items():
        if name != row.paths.manifest.name:
            restore(path, folder / name)
    if row.paths.manifest.name in files:
        restore(files[row.paths.manifest.name], row.paths.manifest)
    return _is_done(folder, row.paths.manifest, reference_sha)


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
