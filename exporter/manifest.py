"""The deployment manifest: what was done to which model, what came out, and how much meaning survived.

One typed schema both writes the manifest and validates it when srcr reads one back (`srcr verify`,
`srcr compare`, a resumed sweep): a manifest is untrusted input, and the first missing or wrong
field is reported by its path. docs/manifest.md documents every field; bump SCHEMA_VERSION when a
field changes meaning.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import unicodedata
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from srcr.base.errors import SrcrError
from srcr.evaluators.uncertainty import ItemScores
from srcr.exporter.recipe import Recipe

SCHEMA_VERSION = 2
LIBRARIES = ("torch", "transformers", "gguf", "llama-cpp-python", "onnx", "onnxruntime-gpu", "onnxruntime")
MAX_MANIFEST_BYTES = 64 << 20  # a manifest is kilobytes; refuse to parse anything near this

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[int, Field(ge=0, le=1 << 60)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
Seconds = Annotated[float, Field(ge=0.0)]
Name = Annotated[str, Field(min_length=1, max_length=255)]
MAX_FILE_NAME_BYTES = 255  # NAME_MAX: a longer name makes the file system raise instead of "no such file"


def _plain_file_name(name: str) -> str:
    """A file srcr opens beside the manifest and names in one-line messages: no folders, no control characters."""
    if (
        name in (".", "..")
        or any(char in "/\\" or unicodedata.category(char) in ("Cc", "Cf") for char in name)
        or len(name.encode("utf-8")) > MAX_FILE_NAME_BYTES
    ):
        raise ValueError(
            "not a plain file name beside the manifest "
            f"(no folders or control characters, at most {MAX_FILE_NAME_BYTES} bytes)"
        )
    return name


FileName = Annotated[Name, AfterValidator(_plain_file_name)]


class Section(BaseModel):
    """Strict types, finite floats, and unknown fields refused: a typo or a forgery is an error."""

    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="forbid", frozen=True)


class OpenSection(Section):
    """A section whose extra fields are format-specific (type mixes, library versions, ...)."""

    model_config = ConfigDict(extra="allow")


class Tool(Section):
    name: Literal["srcr"]
    version: str


class SourceModel(Section):
    id: str
    path: str
    architecture: str
    dtype: str | None = None  # the checkpoint's dtype, in which srcr held and wrote its weights
    parameters: Count
    weights_sha256: Sha256


class Calibration(Section):
    source: str
    sha256: Sha256
    encoding: str
    samples: Count
    seq_len: Count
    corpus_tokens: Count
    capped_by_corpus: bool


class LayerRow(Section):
    layer: Count
    name: str
    sparsity: Fraction
    numel: Count


class Widths(Section):
    layer: Count
    source_layer: Count
    ffn: Count
    heads: Count
    kv_heads: Count


class Structure(Section):
    """What structured pruning removed from the graph (null in `pruning.structure` when nothing)."""

    drop_layers: Fraction
    depth_method: str | None
    ffn_ratio: Fraction
    head_ratio: Fraction
    width_method: str | None
    allocation: str | None
    multiple: Annotated[int, Field(ge=1, le=1 << 16)]
    removed_layers: list[Count]
    layer_scores: list[float]
    widths: list[Widths]
    ffn_before: Count
    heads_before: Count
    kv_heads_before: Count
    parameters_before: Count
    parameters_after: Count
    removed_fraction: Fraction
    notes: list[str]


class Pruning(Section):
    method: str | None  # None: not pruned (the statistics pass still ran)
    sparsity: Fraction
    pattern: str | None
    achieved_sparsity: Fraction
    per_layer: list[LayerRow]
    calibration: Calibration
    imatrix_tokens: Count
    seed: int
    options: dict[str, float | int]  # the method's options (percdamp, block size)
    structure: Structure | None = None
    gptq_grid: str | None = None  # srcr's GPTQ rounded the decoder's matrices onto this type in the same sweep
    # Layers were read from the checkpoint one at a time and written to a pruned folder (--stream).
    streamed: bool = False


class Quantization(OpenSection):
    bits: Annotated[int, Field(ge=1, le=32)]
    type: str


class Artifact(OpenSection):
    file: FileName
    sha256: Sha256
    bytes: Count
    bits_per_weight: Annotated[float, Field(ge=0.0, le=64.0)]


class Compression(Section):
    tcr: float
    actual: float
    baseline_bytes: Count  # 2 bytes per parameter of the dense source model


class Perplexity(Section):
    base: Annotated[float, Field(gt=0.0)]
    compressed: Annotated[float, Field(gt=0.0)]


class Kld(Section):
    mean: Annotated[float, Field(ge=0.0)]
    median: Annotated[float, Field(ge=0.0)]
    p90: Annotated[float, Field(ge=0.0)]
    p99: Annotated[float, Field(ge=0.0)]
    max: Annotated[float, Field(ge=0.0)]


class WorstPrompt(Section):
    id: str
    similarity: float
    base: str
    compressed: str


Cosine = Annotated[float, Field(ge=-1.001, le=1.001)]  # float32 embeddings: a cosine may exceed 1 by ~1e-6


class Semantic(Section):
    mean: Cosine
    min: Cosine
    identical: Fraction
    worst: list[WorstPrompt]


class LastWord(Section):
    acc: Fraction
    base_acc: Fraction
    n: Count


class MultipleChoice(Section):
    acc: Fraction
    acc_norm: Fraction
    base_acc: Fraction
    base_acc_norm: Fraction
    chance: Fraction
    n: Count


class Speed(Section):
    prompt_tokens_per_s: Annotated[float, Field(ge=0.0)] | None
    generation_tokens_per_s: Annotated[float, Field(ge=0.0)] | None


class ReferencePackFile(Section):
    file: FileName
    sha256: Sha256
    bytes: Count


class EvalText(Section):
    source: str
    sha256: Sha256
    encoding: str


NonNegative = Annotated[float, Field(ge=0.0)]
Interval = Annotated[list[float], Field(min_length=2, max_length=2)]  # [low, high], 95%


class TaskItems(Section):
    scores: list[Fraction]
    base_scores: list[Fraction]
    chance: Fraction


class HarnessTask(Section):
    """One lm-eval task on the artifact: its per-item metric's mean, and the base model's on the same items."""

    metric: str
    acc: Fraction
    base_acc: Fraction
    n: Count
    chance: Fraction


class Items(Section):
    """Per-item scores of the artifact and the base on the same items (evaluators.uncertainty.ItemScores):
    what intervals and paired differences between manifests are computed from."""

    window_kl: list[NonNegative]
    window_agreement: list[Fraction]
    window_nll: list[NonNegative]
    base_window_nll: list[NonNegative]
    tokens_per_window: Annotated[int, Field(ge=1, le=1 << 40)]
    similarity: list[Cosine]
    last_word: list[bool] | None = None
    base_last_word: list[bool] | None = None
    choice: list[bool] | None = None
    base_choice: list[bool] | None = None
    chance: Fraction = 0.0
    tasks: dict[str, TaskItems] | None = None  # lm-eval tasks, by name


class Evaluation(Section):
    eval_text: EvalText | None = None
    perplexity: Perplexity
    kld: Kld
    top1_agreement: Fraction
    semantic: Semantic
    last_word: LastWord | None = None
    multiple_choice: MultipleChoice | None = None
    harness: dict[str, HarnessTask] | None = None  # lm-evaluation-harness tasks run on the artifact
    retention: dict[str, Fraction | None]
    sr: Fraction
    speed: Speed
    runtime: dict[str, Any]  # what the runtime reported about itself (backend, threads, buffer types)
    reference_pack: ReferencePackFile
    # What the reference pack was computed on: torch (the dense model) or the target's runtime over the
    # model's unrounded file (--reference artifact); absent in manifests of srcr before 0.5.
    reference_runtime: dict[str, Any] | None = None
    settings: dict[str, Any]  # the evaluation settings the pack was built with (evaluators.reference.EvalSettings)
    items: Items | None = None  # absent in manifests of srcr before 0.4
    intervals: dict[str, Interval] | None = None  # figure -> 95% bootstrap interval over items


class Device(Section):
    prune: str  # where PyTorch calibrated and pruned
    machine: str
    system: str
    gpu: str | None = None
    reference: str | None = None  # where the reference pack was computed: "torch cpu", "llama.cpp CPU", ...
    evaluate: str | None = None  # the artifact's runtime and the backend it ran on


class Manifest(Section):
    schema_version: Literal[2]
    tool: Tool
    created: str
    name: Name
    format: str
    source_model: SourceModel
    pruning: Pruning
    quantization: Quantization
    artifact: Artifact
    compression: Compression
    evaluation: Evaluation | None
    srcr_definition: str
    versions: dict[str, str]
    device: Device
    timings_s: dict[str, Seconds]
    sr: Fraction | None = None
    srcr: float | None = None
    sr_actual: float | None = None
    srcr_interval: Interval | None = None  # Sr's interval times TCr
    # The resolved recipe this artifact was made with: `srcr export --recipe M.manifest.json` replays it
    # (absent in manifests written before srcr had recipes).
    recipe: Recipe | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=False) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def item_scores(manifest: Manifest) -> ItemScores | None:
    """The manifest's per-item scores, for intervals and paired differences; None when it has none (srcr
    before 0.4, or --no-eval). Item sets that disagree in length are a one-line error."""
    evaluation = manifest.evaluation
    if evaluation is None or evaluation.items is None:
        return None
    try:
        return ItemScores.from_dict(evaluation.items.model_dump())
    except ValueError as error:
        raise SrcrError(f"{manifest.name}'s per-item scores are inconsistent ({error}); re-export it") from None


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def device_section(device: str, reference: str | None = None, evaluate: str | None = None) -> Device:
    gpu = None
    if device == "cuda":
        import torch

        gpu = torch.cuda.get_device_name(0)
    return Device(
        prune=device,
        machine=platform.machine(),
        system=platform.system(),
        gpu=gpu,
        reference=reference,
        evaluate=evaluate,
    )


def where_ran(runtime_info: dict[str, Any] | None) -> str | None:
    """ "<runtime> <backend>" from what a runtime reported about itself (its `info()`)."""
    if not runtime_info:
        return None
    backend = runtime_info.get("device") or runtime_info.get("backend") or runtime_info.get("providers")
    return f"{runtime_info.get('runtime', 'unknown')} {backend}" if backend else str(runtime_info.get("runtime"))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build(data: dict[str, Any]) -> Manifest:
    """A manifest from freshly computed sections; a failure here is srcr's own bug, not the user's."""
    return Manifest.model_validate(_plain(data), strict=False)


def _plain(value: Any) -> Any:
    """JSON-shaped data (tuples to lists, numpy scalars to Python numbers) for validation."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(_printable(part) for part in problem["loc"]) or "(top level)"
    return f"{where}: {problem['msg']}"


def _printable(part: Any) -> str:
    """A field name for the one-line message: keys come from the file and may hold newlines or terminal escapes."""
    text = str(part)
    if not text or not text.isprintable():
        text = repr(text)
    return text if len(text) <= 80 else f"{text[:77]}..."


def parse_manifest(text: str, origin: str) -> Manifest:
    """Validate manifest JSON text; every problem is a one-line SrcrError naming the first bad field."""
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, RecursionError, ValueError):
        raise SrcrError(f"{origin} is not valid JSON; pass a <name>.manifest.json written by srcr export") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise SrcrError(f"{origin} is not an srcr manifest (no schema_version); pass a manifest written by srcr export")
    version = data["schema_version"]
    if isinstance(version, int) and not isinstance(version, bool) and version != SCHEMA_VERSION:
        if version > SCHEMA_VERSION:
            raise SrcrError(f"{origin} uses manifest schema {version}; upgrade srcr to read it")
        raise SrcrError(f"{origin} uses manifest schema {version} (an older srcr); re-export it with this srcr")
    try:
        return Manifest.model_validate(data)
    except ValidationError as error:
        raise SrcrError(f"{origin} is not a valid srcr manifest: {first_problem(error)}") from None


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def read_manifest(path: Path) -> Manifest:
    path = Path(path)
    if path.is_dir():
        raise SrcrError(f"{path} is a folder; pass the <name>.manifest.json that srcr export wrote")
    if not path.is_file():
        raise SrcrError(f"manifest {path} does not exist; pass the <name>.manifest.json that srcr export wrote")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SrcrError(f"{path} is too large to be an srcr manifest; pass a manifest written by srcr export")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SrcrError(f"{path} is not UTF-8 text; pass a manifest written by srcr export") from None
    return parse_manifest(text, str(path))
