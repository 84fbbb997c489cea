"""The one orchestrator behind `srcr export` and `srcr sweep` (and `srcr.export`, `srcr.sweep`).

Its input is a recipe (exporter/recipe.py) and the run's own options (output folder, overwrite, pickle);
each artifact's manifest gets the recipe resolved for that artifact (`job_recipe`), which replays it.

plan (every input checked, nothing expensive) → load → reference pack (dense model) → per pruning
setting: calibrate + prune → per quantization: convert + quantize → evaluate → manifest.

`srcr export` runs it for one configuration, `srcr sweep` (exporter/sweep.py) for many, sharing the
load, the calibration tokens and the reference pack. Each stage borrows the model and leaves it where
it found it. In memory, a pruning setting prunes the dense model itself or a fresh copy read from the
source folder once the previous one is gone, so one copy of the model is in memory at a time.
Streamed (--stream), no copy is: only a skeleton and its embedding are loaded, each setting reads the
layers from the source folder one at a time into a pruned folder (exporter/streaming.py), and the
target converts that folder tensor by tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srcr.base.allocation import KlCurve
from srcr.base.compression import baseline_bytes, tcr
from srcr.base.errors import SrcrError
from srcr.base.files import (
    atomic_path,
    check_output_folder,
    check_writable,
    output_folder,
    output_lock,
    remove_stale_partials,
    sha256_of,
    temporary_folder,
)
from srcr.base.placement import placed
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.weights import FolderWriter, SafetensorsFolder
from srcr.evaluators.reference import ReferencePack
from srcr.evaluators.retention import SRCR_DEFINITION
from srcr.evaluators.retention import srcr as srcr_score
from srcr.exporter import manifest as manifests
from srcr.exporter.calibration import (
    CalibrationSet,
    TextSource,
    calibration_text,
    check_calibration_request,
    load_calibration,
)
from srcr.exporter.evaluation import (
    EvalInputs,
    as_path,
    build_reference,
    build_reference_from_artifact,
    eval_inputs,
    evaluate_artifact,
)
from srcr.exporter.models import (
    LoadedModel,
    ModelSource,
    load_weights,
    loaded_model,
    open_source,
    skeleton,
    storage_dtype,
)
from srcr.exporter.pruning import PruneReport, PruneSpec, check_prunable, parse_pattern, prune_model, validate_spec
from srcr.exporter.pruning.driver import decoder_layers
from srcr.exporter.pruning.structured import (
    StructureReport,
    StructureSpec,
    check_fits,
    check_layout,
    check_structure,
    prune_structure,
)
from srcr.exporter.recipe import PruneStage, Recipe, StructureStage
from srcr.exporter.streaming import (
    FromDisk,
    check_streamable,
    finish_folder,
    open_streamed,
    stream_fits,
)
from srcr.targets.base import BudgetRequest, QuantSpec, Target
from srcr.targets.registry import get_target

if TYPE_CHECKING:
    import torch

__all__ = ["run_export"]


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
    """Where PyTorch runs (the dense reference and pruning): auto picks CUDA when there is one."""
    import torch

    device = device.lower()
    if device not in ("auto", "cpu", "cuda"):
        raise SrcrError(f"unknown --device {device!r}; choose auto, cpu or cuda")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SrcrError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return device


def prune_spec_for(sparsity: float, pattern: str | None, stage: PruneStage) -> PruneSpec:
    """The pruning request of `stage` at `sparsity` or `pattern` (a sweep's axes replace the stage's own)."""
    spec = PruneSpec(
        method=stage.method,
        sparsity=sparsity,
        pattern=parse_pattern(pattern) if pattern else None,
        block_size=stage.block_size,
        percdamp=stage.percdamp,
    )
    validate_spec(spec)
    return spec


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", Path(text).name.lower()).strip("-") or "model"


@dataclass(frozen=True)
class Setting:
    """One way of pruning: structure removed from the graph, then weights zeroed (either may be empty)."""

    prune: PruneSpec
    structure: StructureSpec = field(default_factory=StructureSpec)

    @property
    def changes_weights(self) -> bool:
        return self.prune.solves or self.structure.active

    @property
    def label(self) -> str:
        parts = [self.structure.label()] if self.structure.active else []
        if self.prune.pattern:
            parts.append(f"{self.prune.method}-{self.prune.pattern[0]}of{self.prune.pattern[1]}")
        elif self.prune.prunes:
            parts.append(f"{self.prune.method}-s{round(self.prune.sparsity * 100):02d}")
        return "-".join(parts) or "dense"


def default_name(source: str, setting: Setting, spec: QuantSpec) -> str:
    quantizer = "gptq-" if spec.grid is not None else ""
    return f"{_slug(source)}-{setting.label}-{quantizer}{_slug(spec.quant_type)}"


def setting_for(setting: Setting, spec: QuantSpec) -> Setting:
    """The setting as `spec` needs it: srcr's GPTQ rounds onto the spec's grid in the pruning pass itself,
    so each such quantization has a calibration pass of its own."""
    if spec.grid is None:
        return setting
    return dataclasses.replace(setting, prune=dataclasses.replace(setting.prune, grid=spec.grid))


@dataclass
class Plan:
    """A run's inputs, every one read and checked before the first expensive stage."""

    target: Target
    specs: list[QuantSpec]
    settings: list[Setting]
    device: str
    source: ModelSource
    calibration_text: TextSource
    evaluation: EvalInputs | None
    calib_samples: int | None
    seq_len: int | None
    seed: int
    stream: bool = False  # layers read from disk one at a time; the model is never whole in memory
    reference: str = "torch"  # the dense model in PyTorch, or "artifact": its unrounded file in the target's runtime
    recipe: Recipe = field(default_factory=Recipe)  # what was asked, for each artifact's resolved recipe
    # (quant_type, grid) of each resolved spec -> what asked for it: (bits, type, quantizer)
    requests: dict[tuple[str, str | None], QuantRequest] = field(default_factory=dict)


STREAM_CHOICES = ("auto", "on", "off")
REFERENCE_CHOICES = ("auto", "torch", "artifact")
QuantRequest = tuple[int | None, str | None, str | None]  # bits, type name, quantizer (None: the format's own)


def make_plan(
    recipe: Recipe,
    out: Path,
    allow_pickle: bool,
    bits: Sequence[int | None],
    quant_type: str | None,
    settings: Sequence[Setting],
    quantizers: Sequence[str | None] = (None,),
    quant_types: Sequence[str] = (),
) -> Plan:
    """Cheapest checks first: the recipe, then files, then the model's config; no weight is read here.

    Every quantizer is crossed with every bit-width and every named type (`quant_types`, beside
    `bits`); None is the recipe's quantizer (quantize.quantizer, itself None for the format's own)."""
    target = get_target(recipe.export.format)
    _check_choice("--stream", recipe.model.stream, STREAM_CHOICES)
    _check_choice("--reference", recipe.evaluate.reference, REFERENCE_CHOICES)
    target_options = recipe.quantize.target_options()
    asked = [
        (width, name, quantizer or recipe.quantize.quantizer)
        for quantizer in quantizers
        for width, name in [(width, quant_type) for width in bits] + [(None, name) for name in quant_types]
    ]
    resolved = [
        (target.resolve_quant(width, name, _with_quantizer(target_options, quantizer)), (width, name, quantizer))
        for width, name, quantizer in asked
    ]
    calib = recipe.calibration
    check_calibration_request(calib.samples, calib.seq_len)
    device = resolve_device(recipe.model.device)
    check_output_folder(out)
    calibration = calibration_text(as_path(calib.text), calib.encoding)
    _check_sha("calibration text", calibration.sha256, calib.sha256, "calibration.sha256")
    evaluate = recipe.evaluate
    if not evaluate.enabled and evaluate.lm_eval_tasks:
        raise SrcrError("--lm-eval-tasks runs during evaluation; drop --no-eval or the tasks")
    inputs = eval_inputs(evaluate) if evaluate.enabled else None
    source = open_source(recipe.model.source, allow_pickle)
    if recipe.model.weights_sha256 is not None:
        expected = recipe.model.weights_sha256
        _check_sha(f"the model in {source.folder}", source.weights_sha256, expected, "model.weights_sha256")
    dtype = dtype_name(storage_dtype(source.config))
    # A width named by --bits is the checkpoint's own kind of it (a bfloat16 model's 16 bits are BF16).
    resolved = [
        (target.for_checkpoint(spec, dtype) if request[1] is None else spec, request) for spec, request in resolved
    ]
    requests: dict[tuple[str, str | None], QuantRequest] = {}
    for spec, request in resolved:
        requests.setdefault((spec.quant_type, spec.grid), request)
    specs = list({(spec.quant_type, spec.grid): spec for spec, _ in resolved}.values())
    settings = [_fit_structure(setting, target, specs) for setting in settings]
    for spec in specs:
        target.check_model(source.config, spec)
    target.check_files(source.folder, source.config)
    model_skeleton = skeleton(source.config)
    matrices = _matrix_shapes(model_skeleton)
    for spec in specs:
        target.check_budget(matrices, spec)
    layers = decoder_layers(model_skeleton)  # calibration walks them, whatever is pruned
    for setting in {setting_for(setting, spec) for setting in settings for spec in specs}:
        check_prunable(source.config, setting.prune)
        if setting.structure.active:
            check_layout(layers[0])
            check_fits(source.config, setting.structure)
            global_widths = setting.structure.width and setting.structure.allocation == "global"
            target.check_structure(source.config, setting.structure.drop_layers > 0, global_widths)
    if any(spec.per_tensor_gptq for spec in specs):
        _check_per_tensor_gptq(source.config, settings, out)
    stream = _decide_stream(recipe.model.stream, target, source, model_skeleton, settings, specs)
    if stream and any(spec.allocates for spec in specs):
        raise SrcrError(
            "--budget-mb / --budget-bpw measure each tensor's sensitivity with the model in memory, and this "
            "export would stream it; pass --stream off (needs the model's size in free memory)"
        )
    reference = evaluate.reference if evaluate.reference != "auto" else "artifact" if stream else "torch"
    if inputs is not None and reference == "artifact":
        target.reference_spec(dtype)  # the target can make one: checked now
    return Plan(
        target=target,
        specs=specs,
        settings=list(settings),
        device=device,
        source=source,
        calibration_text=calibration,
        evaluation=inputs,
        calib_samples=calib.samples,
        seq_len=calib.seq_len,
        seed=calib.seed,
        stream=stream,
        reference=reference,
        recipe=recipe,
        requests=requests,
    )


def _matrix_shapes(model: Any) -> list[tuple[int, int]]:
    """[rows, columns] of every weight matrix (a tied embedding once): what a budget has to store."""
    return [tuple(parameter.shape) for parameter in model.parameters() if parameter.dim() == 2]


def _check_sha(what: str, actual: str, expected: str | None, field_name: str) -> None:
    if expected is not None and actual != expected:
        raise SrcrError(
            f"{what} is not the one the recipe was made with (sha256 {actual[:12]}…, recipe {expected[:12]}…); "
            f"point the recipe at the original or drop {field_name}"
        )


def _check_choice(flag: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise SrcrError(f"unknown {flag} {value!r}; choose {', '.join(choices)}")


def dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _decide_stream(
    choice: str,
    target: Target,
    source: ModelSource,
    model: Any,
    settings: Sequence[Setting],
    specs: Sequence[QuantSpec],
) -> bool:
    """--stream on: stream or say why not; auto: stream when the model cannot be held and it can stream."""
    if choice == "off" or (choice == "auto" and stream_fits(source)):
        return False
    reason = _why_not_streamed(target, source, model, settings, specs)
    if choice == "on" and reason is not None:
        raise SrcrError(f"--stream: {reason}")
    return reason is None


def _why_not_streamed(
    target: Target, source: ModelSource, model: Any, settings: Sequence[Setting], specs: Sequence[QuantSpec]
) -> str | None:
    if not target.streams:
        return f"the {target.name} target traces the whole model in memory; use --format gguf or --no-stream"
    if any(setting.structure.active for setting in settings):
        return "structured pruning scores and cuts the whole model in memory; use --no-stream"
    if any(spec.grid is not None for spec in specs):
        return (
            "--quantizer gptq keeps the codes of every layer in memory (2 bytes a weight, a 16-bit model's size); "
            "use --quantizer llama.cpp or --no-stream"
        )
    try:
        check_streamable(source, model)
    except SrcrError as error:
        return str(error)
    return None


def _with_quantizer(target_options: dict[str, object], quantizer: str | None) -> dict[str, object]:
    return target_options if quantizer is None else {**target_options, "quantizer": quantizer}


def _fit_structure(setting: Setting, target: Target, specs: Sequence[QuantSpec]) -> Setting:
    """Check a setting's structure request against the target, and round widths to its blocks."""
    structure = setting.structure
    if not structure.active:
        return setting
    if structure.multiple == 0:  # "auto": whatever every quantization of the run needs
        multiple = math.lcm(*(target.width_multiple(spec) for spec in specs))
        structure = dataclasses.replace(structure, multiple=multiple)
    check_structure(structure)
    return dataclasses.replace(setting, structure=structure)


@contextlib.contextmanager
def workspace(out: Path, lock_name: str, what: str) -> Iterator[Path]:
    """The output folder for one run: created if needed (and removed again if the run fails while it
    is still empty), locked against a concurrent run writing the same files, cleared of dead runs'
    temporary files."""
    with output_folder(out) as folder, output_lock(folder, lock_name, what):
        remove_stale_partials(folder)
        yield folder


@dataclass
class PrunedModel:
    """A model after calibration and pruning, with what the manifest needs to say about it."""

    loaded: LoadedModel  # streamed: a skeleton whose tensors are in `loaded.weights` (the pruned folder)
    setting: Setting
    report: PruneReport
    calibration: CalibrationSet
    seed: int
    structure: StructureReport | None = None

    @property
    def prune_spec(self) -> PruneSpec:
        return self.setting.prune

    @property
    def streamed(self) -> bool:
        return self.loaded.weights is not None


def load_stage(plan: Plan, timer: StageTimer, progress: ProgressFn) -> LoadedModel:
    """The dense model in memory, or (streamed) its skeleton with the embedding and the source folder."""
    with timer.stage("load"):
        progress("load model", 0, 1)
        if plan.stream:
            folder = SafetensorsFolder(plan.source.folder, plan.source.weight_files)
            loaded = loaded_model(plan.source, open_streamed(plan.source, folder), folder)
        else:
            loaded = load_weights(plan.source)
        progress("load model", 1, 1)
    return loaded


def calibration_stage(plan: Plan, loaded: LoadedModel) -> CalibrationSet:
    return load_calibration(loaded.tokenizer, plan.calibration_text, plan.calib_samples, plan.seq_len, plan.seed)


def reference_stage(
    plan: Plan, loaded: LoadedModel, scratch: Path, timer: StageTimer, progress: ProgressFn
) -> ReferencePack | None:
    """The dense model's reference pack: in PyTorch (a streamed model is loaded whole for it, then freed),
    or from the model's unrounded file in the target's runtime (`plan.reference == "artifact"`)."""
    if plan.evaluation is None:
        return None
    with timer.stage("reference"):
        if plan.reference == "artifact":
            spec = plan.target.reference_spec(dtype_name(loaded.dtype))
            return build_reference_from_artifact(
                plan.target, spec, loaded, plan.evaluation, scratch, export_hints(loaded, "reference"), progress
            )
        if loaded.weights is not None:
            return build_reference(load_weights(plan.source), plan.evaluation, plan.device, progress)
        return build_reference(loaded, plan.evaluation, plan.device, progress)


def export_hints(loaded: LoadedModel, artifact_name: str) -> dict[str, Any]:
    return {
        **loaded.hints,
        "artifact_name": artifact_name,
        # for llama.cpp's converter: the tokenizer files as shipped, and the model's name
        "source_folder": str(loaded.path),
        "model_name": Path(loaded.source).name,
    }


@contextlib.contextmanager
def prune_stage(
    plan: Plan,
    dense: LoadedModel,
    setting: Setting,
    calibration: CalibrationSet,
    scratch: Path,
    timer: StageTimer,
    progress: ProgressFn,
    reuse_dense: bool,
) -> Iterator[PrunedModel]:
    """Remove structure, then calibrate and prune. The statistics-only pass leaves the weights alone, so
    it always works on `dense`; anything that changes weights works on `dense` itself only when the
    caller needs it no more (`reuse_dense`). A streamed model is pruned into a folder under `scratch`,
    which lives as long as the block."""
    if dense.weights is not None:
        # Streamed: the layers come from disk and, when they change, go into a pruned folder.
        scratch_folder = temporary_folder(scratch, "pruned") if setting.changes_weights else contextlib.nullcontext()
        with scratch_folder as folder:
            writer = FolderWriter(folder) if folder is not None else None
            with timer.stage("calibrate_prune"):
                home = FromDisk(dense.model, dense.weights, writer)
                report = prune_model(dense.model, calibration.input_ids, setting.prune, plan.device, progress, home)
                pruned = dense
                if writer is not None:
                    pruned = dataclasses.replace(dense, weights=finish_folder(plan.source, dense.weights, writer))
            yield PrunedModel(pruned, setting, report, calibration, plan.seed)
        return
    import torch

    model = dense if reuse_dense or not setting.changes_weights else load_weights(plan.source)
    structure = None
    if setting.structure.active:
        with timer.stage("structure"), placed(model.model, dtype=torch.float32):
            structure = prune_structure(model.model, calibration.input_ids, setting.structure, plan.device, progress)
    with timer.stage("calibrate_prune"):
        report = prune_model(model.model, calibration.input_ids, setting.prune, device=plan.device, progress=progress)
    yield PrunedModel(model, setting, report, calibration, plan.seed, structure)


def pruning_section(pruned: PrunedModel) -> dict[str, Any]:
    spec, report, calibration = pruned.prune_spec, pruned.report, pruned.calibration
    return {
        "method": spec.method if spec.prunes else None,
        "sparsity": spec.target_sparsity,
        "pattern": f"{spec.pattern[0]}:{spec.pattern[1]}" if spec.pattern else None,
        "achieved_sparsity": report.overall_sparsity,
        "per_layer": [row.__dict__ for row in report.per_layer],
        "calibration": {
            "source": calibration.source,
            "sha256": calibration.sha256,
            "encoding": calibration.encoding,
            "samples": calibration.n_samples,
            "seq_len": calibration.seq_len,
            "corpus_tokens": calibration.corpus_tokens,
            "capped_by_corpus": calibration.capped,
        },
        "imatrix_tokens": report.imatrix_tokens,
        "seed": pruned.seed,
        "options": {"percdamp": spec.percdamp, "block_size": spec.block_size} if spec.method == "sparsegpt" else {},
        # srcr's GPTQ rounded the decoder's matrices onto this grid in the same sweep as pruning.
        "gptq_grid": spec.grid,
        "structure": structure_section(pruned),
        "streamed": pruned.streamed,
    }


def structure_section(pruned: PrunedModel) -> dict[str, Any] | None:
    report, spec = pruned.structure, pruned.setting.structure
    if report is None:
        return None
    return {
        "drop_layers": spec.drop_layers,
        "depth_method": spec.depth_method if spec.drop_layers > 0 else None,
        "ffn_ratio": spec.ffn_ratio,
        "head_ratio": spec.head_ratio,
        "width_method": spec.width_method if spec.width else None,
        "allocation": spec.allocation if spec.width else None,
        "multiple": spec.multiple,
        "removed_layers": report.removed_layers,
        "layer_scores": report.layer_scores,
        "widths": [row.__dict__ for row in report.widths],
        "ffn_before": report.ffn_before,
        "heads_before": report.heads_before,
        "kv_heads_before": report.kv_heads_before,
        "parameters_before": report.parameters_before,
        "parameters_after": report.parameters_after,
        "removed_fraction": report.removed_fraction,
        "notes": report.notes,
    }


def evaluation_section(figures: dict[str, Any], pack: ReferencePack, reference: Path) -> dict[str, Any]:
    return {
        **figures,
        "eval_text": pack.meta.get("eval_text"),
        "reference_runtime": pack.meta.get("base_runtime"),
        "reference_pack": {"file": reference.name, "sha256": sha256_of(reference), "bytes": reference.stat().st_size},
        "settings": pack.settings_dict(),
    }


def write_export(
    pruned: PrunedModel,
    plan: Plan,
    spec: QuantSpec,
    paths: OutputPaths,
    pack: ReferencePack | None,
    timer: StageTimer,
    progress: ProgressFn,
    recipe: Recipe,
    overwrite: bool = False,
    save_pack: bool = True,
) -> manifests.Manifest:
    """Convert + quantize, evaluate, and write artifact, reference pack and manifest together.

    Everything is written under temporary names and renamed at the end (pack and manifest first,
    artifact last), so an interrupted or failed export leaves nothing behind under the final names.
    With `save_pack=False` the pack already lies at `paths.reference` (a sweep shares one).
    """
    target, loaded = plan.target, pruned.loaded
    with contextlib.ExitStack() as outputs:
        artifact_tmp = outputs.enter_context(atomic_path(paths.artifact, overwrite))
        sensitivity = whole_model_kl = gptq = None
        if spec.allocates:
            grams = None
            if spec.per_tensor_gptq:
                from srcr.exporter.hessians import PerTensorGptq, gram_storage, input_grams

                folder = None
                if gram_storage(loaded.model.config, paths.artifact.parent) == "disk":
                    folder = outputs.enter_context(temporary_folder(paths.artifact.parent, "grams"))
                with timer.stage("statistics"):
                    grams = input_grams(loaded.model, pruned.calibration.input_ids, plan.device, progress, folder)
                gptq = PerTensorGptq(loaded.model, grams, plan.device).solver()
            with timer.stage("sensitivity"):
                sensitivity = sensitivity_stage(pruned, plan, progress, grams)
            if BudgetRequest.of(spec).check:
                from srcr.exporter.sensitivity import WholeModelKl

                whole_model_kl = WholeModelKl(pruned.loaded.model, pruned.calibration.input_ids, plan.device)
        with timer.stage("export"):
            result = target.export(
                loaded.model,
                loaded.tokenizer,
                spec,
                artifact_tmp,
                imatrix=pruned.report.imatrix,
                hints=export_hints(loaded, paths.artifact.name),
                progress=progress,
                codes=pruned.report.codes,
                weights=loaded.weights,
                sensitivity=sensitivity,
                whole_model_kl=whole_model_kl,
                gptq=gptq,
            )
        timer.split("export", result.stage_seconds)
        evaluation = None
        if pack is not None:
            with timer.stage("evaluate"):
                figures = evaluate_artifact(target, artifact_tmp, pack, progress)
            reference_file = paths.reference
            if save_pack:
                reference_file = outputs.enter_context(atomic_path(paths.reference, overwrite))
                pack.save(reference_file, overwrite=True)  # onto our own temporary name
            evaluation = evaluation_section(figures, pack, reference_file)
            evaluation["reference_pack"]["file"] = paths.reference.name
        manifest = build_manifest(pruned, plan, spec, result, artifact_tmp, paths, evaluation, timer, recipe)
        manifest_tmp = outputs.enter_context(atomic_path(paths.manifest, overwrite))
        manifest_tmp.write_text(manifest.to_json())
    return manifest


def _check_per_tensor_gptq(config: Any, settings: Sequence[Any], out: Path) -> None:
    """--quantizer auto: refused for unstructured pruning (GPTQ per matrix would refill the pruned
    weights; --quantizer gptq prunes and rounds in one solve) and when the Gram matrices would fit
    neither in memory nor on disk beside the output."""
    from srcr.exporter.hessians import gram_storage

    if any(setting.prune.prunes for setting in settings):
        raise SrcrError(
            "--quantizer auto rounds unpruned matrices (its GPTQ would refill pruned weights); drop --sparsity, "
            "or use --quantizer gptq for SparseGPT + GPTQ in one solve"
        )
    gram_storage(config, out)


def sensitivity_stage(
    pruned: PrunedModel, plan: Plan, progress: ProgressFn, grams: Mapping[str, torch.Tensor] | None = None
) -> dict[str, KlCurve]:
    """The KL curve (predicted mean KL at a relative error) of every weight matrix of the pruned model
    (exporter/sensitivity.py), in the Gram metric where `grams` has the matrix; in memory: make_plan
    refuses a budget for a streamed export."""
    from srcr.exporter.sensitivity import measure_sensitivity

    measured = measure_sensitivity(
        pruned.loaded.model,
        pruned.calibration.input_ids,
        pruned.report.imatrix,
        plan.device,
        progress=progress,
        grams=grams,
    )
    return {name: value.curve for name, value in measured.items()}


def build_manifest(
    pruned: PrunedModel,
    plan: Plan,
    spec: QuantSpec,
    result: Any,
    artifact_file: Path,
    paths: OutputPaths,
    evaluation: dict[str, Any] | None,
    timer: StageTimer,
    recipe: Recipe,
) -> manifests.Manifest:
    from srcr import __version__

    loaded = pruned.loaded
    removed = pruned.structure.removed_fraction if pruned.structure is not None else 0.0
    # A budget's bits are what the allocation stores on average, measured on the file.
    bits = result.bits_per_weight if spec.allocates else spec.bits
    tcr_value = tcr(pruned.prune_spec.target_sparsity, bits, removed)
    baseline = baseline_bytes(loaded.n_params)
    actual = 1.0 - result.artifact_bytes / baseline
    sr = evaluation["sr"] if evaluation is not None else None
    return manifests.build(
        {
            "schema_version": manifests.SCHEMA_VERSION,
            "tool": {"name": "srcr", "version": __version__},
            "created": manifests.now(),
            "name": paths.artifact.name.removesuffix(plan.target.suffix),
            "format": spec.format,
            "source_model": {
                "id": loaded.source,
                "path": str(loaded.path),
                "architecture": loaded.architecture,
                "dtype": dtype_name(loaded.dtype),
                "parameters": loaded.n_params,
                "weights_sha256": loaded.weights_sha256,
            },
            "pruning": pruning_section(pruned),
            "quantization": {
                "bits": max(1, round(bits)),
                "type": spec.quant_type,
                **spec.options,
                **result.quantization,
            },
            "artifact": {
                "file": paths.artifact.name,
                "sha256": sha256_of(artifact_file),
                "bytes": result.artifact_bytes,
                "bits_per_weight": result.bits_per_weight,
                **result.format_info,
            },
            "compression": {"tcr": tcr_value, "actual": actual, "baseline_bytes": baseline},
            "evaluation": evaluation,
            "srcr_definition": SRCR_DEFINITION,
            "versions": manifests.library_versions(),
            "device": manifests.device_section(
                plan.device,
                reference=manifests.where_ran(evaluation and evaluation.get("reference_runtime")),
                evaluate=manifests.where_ran(evaluation and evaluation.get("runtime")),
            ),
            "timings_s": dict(timer.seconds),
            "sr": sr,
            "srcr": srcr_score(sr, pruned.prune_spec.target_sparsity, bits, removed) if sr is not None else None,
            "sr_actual": sr * actual if sr is not None else None,
            "srcr_interval": [bound * tcr_value for bound in evaluation["intervals"]["sr"]]
            if evaluation is not None
            else None,
            "recipe": recipe.model_dump(),
        }
    )


def run_export(
    recipe: Recipe,
    out: Path = Path("out"),
    *,
    overwrite: bool = False,
    allow_pickle: bool = False,
    progress: ProgressFn = no_progress,
    timer: StageTimer | None = None,
) -> manifests.Manifest:
    """The whole export the recipe describes; returns the manifest that was written beside the artifact."""
    from srcr.base.files import check_file_name

    if recipe.sweep is not None:
        raise SrcrError("this recipe has sweep axes ([sweep]); run it with srcr sweep --recipe, or remove them")
    prune = recipe.prune
    setting = Setting(prune_spec_for(prune.sparsity, prune.pattern, prune), prune.structure.spec())
    if recipe.export.name is not None:
        check_file_name(recipe.export.name)
    plan = make_plan(recipe, out, allow_pickle, [recipe.quantize.bits], recipe.quantize.type, [setting])
    spec = plan.specs[0]
    fitted = plan.settings[0]
    setting = setting_for(fitted, spec)
    name = recipe.export.name or default_name(plan.source.label, setting, spec)
    paths = OutputPaths.for_name(out, name, plan.target.suffix)
    paths.check(overwrite, with_reference=plan.evaluation is not None)

    timer = timer or StageTimer()
    with workspace(out, name, f"{name} in {out}") as folder:
        loaded = load_stage(plan, timer, progress)
        calibration = calibration_stage(plan, loaded)
        pack = reference_stage(plan, loaded, folder, timer, progress)
        with prune_stage(plan, loaded, setting, calibration, folder, timer, progress, reuse_dense=True) as pruned:
            resolved = job_recipe(plan, fitted, spec, name)
            return write_export(pruned, plan, spec, paths, pack, timer, progress, resolved, overwrite)


def job_recipe(plan: Plan, setting: Setting, spec: QuantSpec, name: str) -> Recipe:
    """The resolved recipe of one artifact, for its manifest: the plan's recipe with this artifact's own
    pruning and quantization (a sweep's axes gone), its name, the files it read as absolute paths, and the
    sha256 of the weights and the calibration text, so that replaying it reads exactly these or refuses, and
    the device and reference the run chose (`auto` decides by the machine; a replay must not)."""
    recipe = plan.recipe
    bits, quant_type, quantizer = plan.requests[(spec.quant_type, spec.grid)]
    if bits is None and quant_type is None and not spec.allocates:
        bits = spec.bits  # the format's default, named: a later srcr may default to another
    prune, structure = setting.prune, setting.structure
    model_source = recipe.model.source
    if model_source is not None and Path(model_source).exists():
        model_source = str(Path(model_source).resolve())
    changes: dict[str, Any] = {
        "model": {"source": model_source, "weights_sha256": plan.source.weights_sha256, "device": plan.device},
        "calibration": {"text": _absolute(recipe.calibration.text), "sha256": plan.calibration_text.sha256},
        "prune": {
            "sparsity": 0.0 if prune.pattern else prune.sparsity,
            "pattern": f"{prune.pattern[0]}:{prune.pattern[1]}" if prune.pattern else None,
            "structure": {key: getattr(structure, key) for key in StructureStage.model_fields},
        },
        "quantize": {"bits": bits, "type": quant_type, "quantizer": quantizer},
        "export": {"name": name},
        "evaluate": {
            "reference": plan.reference,
            **{
                key: _absolute(getattr(recipe.evaluate, key)) for key in ("text", "prompts", "tasks", "lm_eval_include")
            },
        },
        "sweep": None,
    }
    return recipe.merged(changes)


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).resolve())
