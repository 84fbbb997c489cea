"""srcr's Python API: the jobs the CLI runs, for scripts and notebooks (docs/api.md).

    import srcr

    recipe = srcr.Recipe.model_validate({"prune": {"sparsity": 0.25}, "quantize": {"bits": 4}})
    manifest = srcr.export("./my-llama", recipe, out="out")
    print(manifest.sr, manifest.artifact.file)
    outcome = srcr.verify(f"out/{manifest.name}.manifest.json")

Every function takes a recipe as a `Recipe`, a mapping shaped like one, a path to a recipe file or a manifest
(whose embedded recipe reproduces its artifact), or None (the defaults). The CLI commands are thin layers
over these functions: what `srcr export --sparsity 0.25` does, `srcr.export(recipe={"prune": {"sparsity":
0.25}})` does. Errors a user can fix raise `SrcrError` with a one-line message that names the fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress
from srcr.exporter.recipe import Recipe, SweepStage, parse_recipe, read_recipe

if TYPE_CHECKING:
    from srcr.exporter.manifest import Manifest
    from srcr.exporter.sweep import SweepSummary
    from srcr.exporter.verify import VerifyOutcome

RecipeLike = Recipe | Mapping[str, Any] | str | Path | None


def load_recipe(recipe: RecipeLike = None) -> Recipe:
    """A Recipe from any of the forms the API takes (a file's relative paths are taken from its folder)."""
    if recipe is None:
        return Recipe()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe), "the recipe")
    if isinstance(recipe, (str, Path)):
        return read_recipe(Path(recipe))
    raise SrcrError(f"a recipe is a Recipe, a mapping or a file path, not {type(recipe).__name__}")


def _with_model(recipe: Recipe, model: str | Path | None) -> Recipe:
    return recipe if model is None else recipe.merged({"model": {"source": str(model)}})


def export(
    model: str | Path | None = None,
    recipe: RecipeLike = None,
    *,
    out: str | Path = "out",
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
) -> Manifest:
    """Prune, quantize and export `model` (a local folder or hub id; None: the recipe's, or the embedded
    SmolLM2) as the recipe says; evaluate the artifact and write it with its manifest and reference pack
    into `out`. Returns the manifest, which embeds the resolved recipe."""
    from srcr.exporter.pipeline import run_export

    job = _with_model(load_recipe(recipe), model)
    return run_export(job, Path(out), overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)


@dataclass
class SweepResult:
    manifests: list[Manifest]  # one per configuration, in sweep order
    summary: SweepSummary  # records, Pareto fronts, equal-TCr rows, the recommendation
    report: Path  # report.html in the sweep folder


def sweep(
    model: str | Path | None = None,
    recipe: RecipeLike = None,
    *,
    out: str | Path = "sweep",
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
    executor: str = "local",
    ray_address: str | None = None,
    cache: str | Path | None | bool = True,
    task_cpus: int | None = None,
) -> SweepResult:
    """Every combination of the recipe's sweep axes (the default axes when it has none), resumable in `out`;
    ranks them, marks the Pareto fronts and writes report.html. `executor="ray"` runs each pruning setting
    as a Ray task (`ray_address`: None starts a cluster of this machine, "auto" or "HOST:PORT" joins one);
    `cache`: True for the default stage cache, a folder for another, False or None for none; `task_cpus`:
    each Ray task's CPUs and torch threads (None: this machine's torch threads, the local run's bytes)."""
    from srcr.exporter.stage_cache import default_cache_root
    from srcr.exporter.sweep import RunOptions, recommendation_budget, run_sweep, summarize, write_report

    job = _with_model(load_recipe(recipe), model)
    if job.sweep is None:
        job = job.merged({"sweep": SweepStage().model_dump()})
    cache_root = default_cache_root() if cache is True else Path(cache) if cache else None
    if task_cpus is not None and task_cpus < 1:
        raise SrcrError(f"task_cpus={task_cpus}: a Ray task needs at least 1 CPU")
    run = RunOptions(executor=executor, ray_address=ray_address, cache=cache_root, task_cpus=task_cpus)
    manifests = run_sweep(job, Path(out), allow_pickle=allow_pickle, progress=progress, run=run)
    axes = job.sweep
    summary = summarize(manifests, recommendation_budget(job), axes.min_retention)
    title = f"srcr sweep: {manifests[0].source_model.id} ({job.export.format})"
    return SweepResult(manifests, summary, write_report(summary, Path(out), title))


def verify(
    manifest: str | Path,
    *,
    tolerances: Mapping[str, float] | None = None,
    device: str = "auto",
    mode: str = "drift",
    progress: ProgressFn = no_progress,
) -> VerifyOutcome:
    """Re-measure an exported artifact on this machine and compare with its manifest (`outcome.passed`)."""
    from srcr.exporter.verify import verify as run_verify

    return run_verify(Path(manifest), dict(tolerances or {}), device=device, progress=progress, mode=mode)


def replay_notes(path: str | Path) -> list[str]:
    """What differs between the machine a manifest's artifact was made on and this one: where the bytes of a
    replayed artifact may differ (docs/recipe.md). Empty for a recipe file, or when nothing differs."""
    from srcr.exporter.manifest import device_section, library_versions, read_manifest

    path = Path(path)
    if not path.name.endswith(".json"):
        return []
    try:
        manifest = read_manifest(path)
    except SrcrError:
        return []  # a recipe, not a manifest; read_recipe reports any problem
    notes = []
    here = library_versions()
    for library, version in manifest.versions.items():
        if here.get(library) != version:
            notes.append(f"{library} {here.get(library, 'absent')} here, {version} when {manifest.name} was made")
    recorded, current = manifest.device, device_section("cpu")
    if (recorded.machine, recorded.system) != (current.machine, current.system):
        notes.append(f"a {current.system} {current.machine} machine here, {recorded.system} {recorded.machine} then")
    if recorded.gpu:
        notes.append(f"it was pruned on a {recorded.gpu}: the same bytes need the same GPU")
    return notes
