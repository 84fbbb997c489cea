"""`srcr sweep --executor ray`: each pruning setting of a sweep as a Ray task, on this machine or a cluster.

The driver makes the plan, computes the dense reference pack once and puts it in Ray's object store; each
task makes the same plan again (no weight is read for it), loads the model, prunes it once, and writes every
configuration of that setting (artifact and manifest, atomically) into the sweep folder, which on a cluster
of several machines must be a folder they all see. A task is the unit that shares one pruning pass: one task
per configuration would prune the same setting once per quantization. A task whose worker dies is retried
by Ray; the retry skips what the dead one finished, and atomic writes leave nothing half-written, so nothing
is lost or written twice. Ctrl-C cancels the tasks still running; finished configurations stay usable.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from srcr.exporter.manifest import Manifest
    from srcr.exporter.pipeline import Plan
    from srcr.exporter.sweep import Row

TASK_RETRIES = 3  # attempts after a worker dies mid-task (killed, out of memory, node lost)
GIB = 1 << 30


def require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SrcrError("--executor ray needs Ray: pip install 'srcr[ray]' (or use --executor local)") from None
    return ray


def task_resources(plan: Plan, cpus: int = 1) -> dict[str, Any]:
    """What one task declares to Ray's scheduler: CPUs, a GPU when pruning runs on CUDA, and memory from the
    model's size, estimated as `--stream auto` estimates it: the weights once in their dtype (not when
    streamed) and the largest layer's float32 copy with the Hessian and inverse of its widest input, plus
    2 GiB for the activations, the reference pack and the runtime."""
    from srcr.exporter.streaming import in_memory_peak, layer_work

    held = layer_work(plan.source) if plan.stream else in_memory_peak(plan.source)
    return {"num_cpus": cpus, "num_gpus": 1 if plan.device == "cuda" else 0, "memory": held + 2 * GIB}


def run_on_ray(
    plan: Plan,
    folder: Path,
    groups: list[list[Row]],
    allow_pickle: bool,
    address: str | None,
    cache: Path | None,
    finished: Callable[[Row, Manifest], None],
    progress: ProgressFn = no_progress,
    task_cpus: int | None = None,
) -> None:
    """Run each group (the configurations of one pruning setting) as a task; `finished` is called in the
    driver for every configuration as its task returns."""
    import torch

    from srcr.exporter.manifest import parse_manifest

    cpus = task_cpus or torch.get_num_threads()
    ray = require_ray()
    _connect(ray, address)
    pack = ray.put((folder / "reference.npz").read_bytes())
    resources = task_resources(plan, cpus)
    _check_feasible(ray, resources)
    task = ray.remote(setting_task).options(**resources, max_retries=TASK_RETRIES, retry_exceptions=False)
    recipe = plan.recipe.model_dump_json()
    cache_root = str(cache) if cache is not None else None  # a folder every worker sees, as the sweep's
    pending = {
        task.remote(recipe, str(folder), _names(rows), pack, allow_pickle, cache_root, cpus): rows for rows in groups
    }
    total, done = sum(map(len, groups)), 0
    progress("sweep on ray: settings running", 0, len(pending))
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            rows = pending.pop(ready[0])
            try:
                texts = ray.get(ready[0])
            except ray.exceptions.RayTaskError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, SrcrError):
                    raise SrcrError(str(cause)) from None
                raise
            except ray.exceptions.WorkerCrashedError:
                raise SrcrError(
                    f"a Ray worker died {TASK_RETRIES + 1} times running {rows[0].paths.artifact.name}; "
                    "see the Ray logs (out of memory?), then rerun the same command to resume"
                ) from None
            by_name = {row.paths.manifest.name: row for row in rows}
            for name, text in texts:
                finished(by_name[name], parse_manifest(text, name))
                done += 1
            progress("sweep on ray: settings running", len(groups) - len(pending), len(groups))
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)  # Ctrl-C or a failure: nothing keeps running on the cluster
        raise
    if done != total:
        raise SrcrError(f"the Ray tasks returned {done} of {total} configurations; rerun the same command to resume")


# (a task's option, the node resource Ray calls it, its unit, what it is, the fix)
_NEEDS = (
    ("num_cpus", "CPU", 1, "CPUs", "--task-cpus {largest} or fewer"),
    ("num_gpus", "GPU", 1, "GPUs", "--device cpu, or a cluster with a GPU node"),
    ("memory", "memory", GIB, "GiB of memory", "--stream on, or nodes with more memory"),
)


def _check_feasible(ray: Any, resources: dict[str, Any]) -> None:
    """Refuse a task no node of the cluster can hold: Ray would wait for such a node for ever."""
    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    if any(all(resources.get(option, 0) <= float(node.get(name, 0)) for option, name, *_ in _NEEDS) for node in nodes):
        return
    for option, name, unit, what, fix in _NEEDS:
        wanted = resources.get(option, 0)
        largest = max((float(node.get(name, 0)) for node in nodes), default=0.0)
        if wanted > largest:
            raise SrcrError(
                f"each Ray task asks for {wanted / unit:.3g} {what} and the cluster's largest node has "
                f"{largest / unit:.3g}; use " + fix.format(largest=int(largest / unit))
            )
    asked = ", ".join(f"{resources.get(option, 0) / unit:.3g} {what}" for option, _, unit, what, _ in _NEEDS)
    raise SrcrError(f"no node of the Ray cluster has {asked} at once; use --task-cpus or --stream on")


def _names(rows: list[Row]) -> list[str]:
    return [row.paths.manifest.name for row in rows]


def _connect(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        # None: a cluster of this machine, started for the sweep and gone with it.
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    except (ConnectionError, ValueError, RuntimeError) as error:
        where = address or "this machine"
        raise SrcrError(f"could not start or reach a Ray cluster at {where} ({error}); check --ray-address") from None


def setting_task(
    recipe_json: str,
    folder: str,
    names: list[str],
    pack_bytes: bytes,
    allow_pickle: bool,
    cache_root: str | None,
    threads: int,
) -> list[tuple[str, str]]:
    """In a Ray worker: prune one setting and write its configurations `names` (manifest file names) that are
    not done yet; returns (name, manifest JSON) for each, done before (by a dead attempt) or now."""
    import torch

    from srcr.evaluators.reference import ReferencePack
    from srcr.exporter.calibration import load_calibration
    from srcr.exporter.models import load_tokenizer
    from srcr.exporter.pipeline import StageTimer, load_stage
    from srcr.exporter.recipe import Recipe
    from srcr.exporter.stage_cache import StageCache
    from srcr.exporter.sweep import _is_done, run_setting, sweep_plan, sweep_rows

    torch.set_num_threads(max(1, threads))  # the driver's count unless --task-cpus: the same sums as locally
    out = Path(folder)
    plan = sweep_plan(Recipe.model_validate_json(recipe_json), out, allow_pickle)
    rows = [row for row in sweep_rows(plan, out) if row.paths.manifest.name in names]
    with tempfile.TemporaryDirectory(prefix="srcr-ray-") as scratch:
        pack_file = Path(scratch) / "reference.npz"
        pack_file.write_bytes(pack_bytes)
        pack = ReferencePack.load(pack_file)
        reference_sha = _sha256(pack_bytes)
        results: list[tuple[str, str]] = []
        todo = []
        for row in rows:
            done = _is_done(out, row.paths.manifest, reference_sha)
            if done is not None:
                results.append((row.paths.manifest.name, done.to_json()))
            else:
                todo.append(row)
        if todo:
            timer = StageTimer()
            tokens = load_tokenizer(plan.source)  # the model itself only if the pass is not cached
            calibration = load_calibration(tokens, plan.calibration_text, plan.calib_samples, plan.seq_len, plan.seed)
            cache = StageCache(Path(cache_root)) if cache_root is not None else None

            def finished(row: Row, manifest: Manifest) -> None:
                results.append((row.paths.manifest.name, manifest.to_json()))

            setting = todo[0].setting

            def model() -> Any:
                return load_stage(plan, timer, no_progress)

            run_setting(plan, model, setting, todo, calibration, pack, out, timer, no_progress, finished, cache)
    return results


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()
