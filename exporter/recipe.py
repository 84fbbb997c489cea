"""The recipe: one typed description of a job, staged like llm-compressor's (prune, quantize, export, evaluate).

Everything that decides what an export writes and how it is measured is a recipe field; what only decides
where the outputs go or what the run may touch (the output folder, `--overwrite`, `--allow-pickle`) is not,
so a recipe read from someone else's file can neither overwrite files nor load pickled weights. The CLI's
flags build a recipe (`FLAGS` maps each flag to its field), `--recipe FILE` starts from a file (TOML, YAML
or JSON, or a manifest, whose embedded recipe is the resolved one the artifact was made with) and the flags
given on the command line override it. A recipe file is untrusted input like a manifest: strict types,
unknown keys refused, the first problem reported by its path in one line. docs/recipe.md documents it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from srcr.base.errors import SrcrError

RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes
RECIPE_SUFFIXES = (".toml", ".yaml", ".yml", ".json")

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class Stage(BaseModel):
    """Strict types (an int is a float), unknown keys refused, values frozen: a typo is an error, not a default.
    Values are checked where they are used (the pipeline's checks, which name the flag and the fix), not twice."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, allow_inf_nan=False)


class ModelStage(Stage):
    # A local Hugging Face folder or a hub id; None: the embedded SmolLM2-135M-Instruct.
    source: str | None = None
    # When set, the source must hold exactly these weights (a manifest's recipe sets it).
    weights_sha256: Sha256 | None = None
    stream: str = "auto"  # auto, on or off: read the decoder layers from disk one at a time
    device: str = "auto"  # auto, cpu or cuda: where PyTorch runs the reference and pruning


class CalibrationStage(Stage):
    text: str | None = None  # plain text or JSONL with a `text` field; None: gensim's Lee corpus
    encoding: str | None = None  # None: UTF-8 (the built-in Lee corpus: latin-1)
    sha256: Sha256 | None = None  # when set, the text must be exactly this
    # None: 128 samples of 2048 tokens, capped by what the corpus holds; numbers given are honoured or refused.
    samples: int | None = None
    seq_len: int | None = None
    seed: int = 0


class StructureStage(Stage):
    drop_layers: float = 0.0  # fraction of decoder layers removed
    depth_method: str = "bi"  # bi or sleb
    ffn_ratio: float = 0.0  # fraction of FFN channels removed
    head_ratio: float = 0.0  # fraction of KV groups removed
    width_method: str = "flap"  # flap or wanda-sp
    allocation: str = "uniform"  # uniform or global
    multiple: int = 0  # kept FFN widths are multiples of this; 0: the quantization's block width

    def spec(self) -> Any:
        from srcr.exporter.pruning.structured import StructureSpec

        return StructureSpec(**self.model_dump())


class PruneStage(Stage):
    method: str = "sparsegpt"  # sparsegpt, wanda or magnitude (the registry checks the name)
    sparsity: float = 0.0  # fraction of each pruned linear's weights zeroed
    pattern: str | None = None  # "N:M"; replaces sparsity
    percdamp: float = 0.01  # SparseGPT's Hessian dampening
    block_size: int = 128  # SparseGPT's column block
    structure: StructureStage = StructureStage()


class QuantizeStage(Stage):
    bits: int | None = None  # None (and no type): the format's default, 4
    type: str | None = None  # the format's own type name, e.g. Q4_K_M
    # None: the format's own (llama.cpp, ONNX Runtime); gptq: srcr's GPTQ; auto (GGUF budgets): either, per matrix
    quantizer: str | None = None
    pure: bool | None = None  # GGUF: no K-quant mix, every matrix in `type`
    block_size: int | None = None  # ONNX: weights per quantization block
    algo: str | None = None  # ONNX: wls, hqq or rtn
    scheme: str | None = None  # ONNX: weight-only or dynamic
    symmetric: bool | None = None  # ONNX
    # GGUF: choose a type per weight matrix so the file takes at most this many MB (10^6 bytes), or its
    # weight matrices this many bits per weight on average; replaces bits/type.
    budget_mb: float | None = None
    budget_bpw: float | None = None
    # With a budget: measure the additive choice and its alternatives on the whole model, keep the best.
    budget_check: bool | None = None

    def target_options(self) -> dict[str, object]:
        """The options the target's resolve_quant reads, unset ones left out."""
        options = {
            "quantizer": self.quantizer,
            "pure": self.pure,
            "quant_block_size": self.block_size,
            "quant_algo": self.algo,
            "quant_scheme": self.scheme,
            "symmetric": self.symmetric,
            "budget_mb": self.budget_mb,
            "budget_bpw": self.budget_bpw,
            "budget_check": self.budget_check,
        }
        return {key: value for key, value in options.items() if value is not None}


class ExportStage(Stage):
    format: str = "gguf"  # gguf or onnx
    name: str | None = None  # base file name of the outputs; None: from the settings


class EvaluateStage(Stage):
    enabled: bool = True
    reference: str = "auto"  # auto, torch or artifact: where the dense reference is computed
    text: str | None = None  # held-out text; None: gensim's lee.cor
    encoding: str | None = None
    prompts: str | None = None  # extra prompts (JSONL) for semantic similarity
    tasks: str | None = None  # multiple-choice tasks (JSONL)
    builtin_prompts: bool = True
    windows: int | None = None  # None: the evaluators' defaults (evaluators.reference.EvalSettings)
    top_k: int | None = None
    last_word_items: int | None = None
    new_tokens: int | None = None
    lm_eval_tasks: list[str] | None = None
    lm_eval_include: str | None = None
    lm_eval_limit: int | None = None


class SweepStage(Stage):
    """The sweep's axes: every pruning setting crossed with every quantization. They replace the single values
    of prune.sparsity, prune.pattern, prune.structure, quantize.bits, quantize.type and quantize.quantizer."""

    sparsity: list[float] = [0.0, 0.25, 0.5]
    pattern: list[str] = []
    structures: list[StructureStage] = [StructureStage()]
    bits: list[int] = [2, 3, 4, 8]
    quant_type: list[str] = []
    quantizer: list[str] = []  # empty: the format's own
    budget_mb: float | None = None  # recommend the best Sr whose file fits this many MB
    min_retention: float | None = None  # recommend the most compression with Sr at least this


class Recipe(Stage):
    srcr_recipe: Literal[1] = RECIPE_VERSION
    model: ModelStage = ModelStage()
    calibration: CalibrationStage = CalibrationStage()
    prune: PruneStage = PruneStage()
    quantize: QuantizeStage = QuantizeStage()
    export: ExportStage = ExportStage()
    evaluate: EvaluateStage = EvaluateStage()
    sweep: SweepStage | None = None  # only `srcr sweep` runs a recipe with axes

    def merged(self, changes: Mapping[str, Any]) -> Recipe:
        """This recipe with `changes` (nested like the recipe: {"prune": {"sparsity": 0.5}}) laid over it."""
        data = _merge(self.model_dump(), changes)
        try:
            return Recipe.model_validate(data)
        except ValidationError as error:
            raise SrcrError(f"recipe: {first_problem(error)}") from None

    def to_toml(self) -> str:
        return to_toml(self.model_dump(exclude_none=True))


def _merge(base: dict[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def first_problem(error: ValidationError) -> str:
    """The manifest's one-line report of the first bad field, with a hint where YAML misread a pattern."""
    from srcr.exporter.manifest import first_problem as manifest_problem

    problem = error.errors()[0]
    hint = ""
    if problem["loc"] and problem["loc"][-1] == "pattern" and isinstance(problem.get("input"), int):
        hint = " (YAML reads an unquoted 2:4 as a number: quote it, pattern: '2:4')"
    return manifest_problem(error) + hint


def parse_recipe(data: Any, origin: str) -> Recipe:
    if not isinstance(data, dict):
        raise SrcrError(f"{origin} is not a recipe (its top level is not a table); see docs/recipe.md")
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise SrcrError(f"{origin} is not a valid srcr recipe: {first_problem(error)}") from None


def read_recipe(path: Path) -> Recipe:
    """A recipe file (TOML, YAML or JSON), or a manifest's embedded recipe; relative paths in a recipe file are
    taken from the file's folder when they name something there (a hub id stays as written)."""
    from srcr.exporter.manifest import parse_manifest

    path = Path(path)
    text = _read_text(path)
    data = _parse_text(text, path)
    if isinstance(data, dict) and "schema_version" in data:  # a manifest
        manifest = parse_manifest(text, str(path))
        if manifest.recipe is None:
            raise SrcrError(f"{path} was written by an srcr without recipes; re-export it, or pass the flags again")
        return manifest.recipe
    return _relative_to(parse_recipe(data, str(path)), path.parent)


def _read_text(path: Path) -> str:
    if path.is_dir() or not path.is_file():
        raise SrcrError(f"recipe {path} is not a file; pass a recipe (.toml, .yaml, .json) or a manifest")
    from srcr.exporter.manifest import MAX_MANIFEST_BYTES

    limit = MAX_MANIFEST_BYTES if path.suffix.lower() == ".json" else MAX_RECIPE_BYTES  # JSON may be a manifest
    if path.stat().st_size > limit:
        raise SrcrError(f"{path} is too large to be a recipe; pass a recipe (.toml, .yaml, .json) or a manifest")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SrcrError(f"{path} is not UTF-8 text; pass a recipe (.toml, .yaml, .json) or a manifest") from None


def _parse_text(text: str, path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in RECIPE_SUFFIXES:
        raise SrcrError(f"{path}: a recipe is .toml, .yaml, .yml or .json (or a manifest); rename it")
    try:
        if suffix == ".toml":
            return _toml_module().loads(text)
        if suffix == ".json":
            return json.loads(text, parse_constant=_refuse_constant)
        import yaml

        # An alias repeats a node without copying it: a few lines can stand for a tree too large to check.
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)):
            raise SrcrError(f"{path} uses YAML aliases (*name); a recipe writes each value out")
        return yaml.safe_load(text)
    except (ValueError, RecursionError) as error:  # tomllib's and json's errors are ValueErrors
        raise SrcrError(f"{path} is not valid {suffix.lstrip('.').upper()} ({_one_line(error)})") from None
    except Exception as error:  # yaml.YAMLError and its kin
        if type(error).__module__.startswith("yaml"):
            raise SrcrError(f"{path} is not valid YAML ({_one_line(error)})") from None
        raise


def _toml_module() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser, under its own name
        import tomli as tomllib
    return tomllib


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 160 else f"{text[:157]}..."


# The recipe fields that name files: (stage, field).
PATH_FIELDS = (
    ("model", "source"),
    ("calibration", "text"),
    ("evaluate", "text"),
    ("evaluate", "prompts"),
    ("evaluate", "tasks"),
    ("evaluate", "lm_eval_include"),
)


def _relative_to(recipe: Recipe, folder: Path) -> Recipe:
    changes: dict[str, dict[str, str]] = {}
    for stage, name in PATH_FIELDS:
        value = getattr(getattr(recipe, stage), name)
        if value is not None and not Path(value).is_absolute() and (folder / value).exists():
            changes.setdefault(stage, {})[name] = str((folder / value).resolve())
    return recipe.merged(changes) if changes else recipe


def to_toml(data: Mapping[str, Any]) -> str:
    """TOML for a recipe's plain data (scalars, lists of scalars, tables, lists of tables); None is left out."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_table(data: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    plain = {key: value for key, value in data.items() if not _is_table(value) and not _is_table_list(value)}
    for key, value in plain.items():
        lines.append(f"{_key(key)} = {_value(value)}")
    for key, value in data.items():
        if _is_table(value):
            lines += ["", f"[{'.'.join(map(_key, [*path, key]))}]"]
            _emit_table(value, [*path, key], lines)
        elif _is_table_list(value):
            for item in value:
                lines += ["", f"[[{'.'.join(map(_key, [*path, key]))}]]"]
                _emit_table(item, [*path, key], lines)


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Mapping) for item in value)


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() and key.isascii() else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's; DEL is the one control character JSON leaves raw.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("a recipe holds finite numbers only")
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")
