"""The reference pack: the dense model's outputs, and scoring any runtime against them.

`build_reference_pack` runs the base model once through the same `Runtime` interface the
deployed artifacts use and keeps what every evaluator needs (token windows with top-k
distributions, prompt token ids with base generations and their embeddings, last-word and
multiple-choice items with base results). `evaluate` then scores an artifact's runtime from the
pack alone: `srcr verify` needs the artifact and its pack, never the base model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.files import atomic_path
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.evaluators.distribution import DistributionReference, token_windows
from srcr.evaluators.harness import HarnessReference, HarnessRequest
from srcr.evaluators.lastword import LastWordReference
from srcr.evaluators.multiple_choice import MultipleChoiceReference
from srcr.evaluators.retention import (
    SRCR_DEFINITION,
    accuracy_retention,
    perplexity_retention,
    semantic_retention,
    semantic_retention_score,
)
from srcr.evaluators.semantic import Embedder, SemanticReference
from srcr.evaluators.uncertainty import ItemScores, intervals

PACK_FORMAT = "srcr-reference/v1"
MAX_PACK_BYTES = 2 << 30  # uncompressed; SmolLM2's default pack is 1.6 MB, a 128k-vocabulary model's ~10 MB
MAX_PACK_MEMBERS = 256
# What np.savez / np.savez_compressed write. zipfile raises NotImplementedError, RuntimeError or
# lzma.LZMAError (none of them a "damaged file" error) for other methods and for encrypted members.
PACK_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)
UNSUPPORTED_ZIP_FLAGS = 0x1 | 0x20 | 0x40  # encrypted, patched data, strong encryption


@dataclass(frozen=True)
class EvalSettings:
    windows: int = 8  # perplexity/KL windows: 8 x 512 tokens fit gensim's lee.cor
    window_len: int = 512
    top_k: int = 128  # base tokens kept per scored position for KL (docs/metrics.md: error vs k)
    max_new_tokens: int = 32  # greedy continuation length for semantic similarity
    n_last_word: int = 100  # last-word items (0 = skip the evaluator)
    last_word_context: int = 128  # at most this many context tokens per last-word item
    seed: int = 0  # which sentences become last-word items
    chat_template: bool = True  # wrap prompts in the model's chat template when it has one
    n_worst: int = 5  # worst prompts reported by the semantic evaluator

    def validate(self) -> None:
        if self.windows < 1:
            raise SrcrError(f"windows must be at least 1, got {self.windows}; pass a positive window count")
        if self.window_len < 4:
            raise SrcrError(f"window length must be at least 4 tokens, got {self.window_len}; pass a longer one")
        if self.top_k < 1:
            raise SrcrError(f"top-k must be at least 1, got {self.top_k}; pass a positive top-k")
        if self.max_new_tokens < 1:
            raise SrcrError(f"max new tokens must be at least 1, got {self.max_new_tokens}; pass a positive count")
        if self.n_last_word < 0 or self.last_word_context < 1:
            raise SrcrError("last-word item count must be >= 0 and its context >= 1 token; fix the settings")
        for name, value, limit in (
            ("windows", self.windows, 100_000),
            ("window length", self.window_len, 1 << 16),
            ("top-k", self.top_k, 1 << 18),
            ("max new tokens", self.max_new_tokens, 1 << 14),
            ("last-word items", self.n_last_word, 1 << 20),
            ("last-word context", self.last_word_context, 1 << 16),
            ("worst prompts", self.n_worst, 10_000),
        ):
            if value > limit:
                raise SrcrError(f"{name} {value} is above srcr's limit of {limit}; pass a smaller number")


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{key}": value for key, value in arrays.items()}


def _section(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    start = f"{prefix}."
    return {key[len(start) :]: value for key, value in arrays.items() if key.startswith(start)}


@dataclass
class ReferencePack:
    settings: EvalSettings
    distribution: DistributionReference
    semantic: SemanticReference
    last_word: LastWordReference | None
    multiple_choice: MultipleChoiceReference | None
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-serializable provenance

    def settings_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.settings)

    def save(self, path: Path, overwrite: bool = False) -> None:
        """One compressed .npz, written atomically; loadable without pickle."""
        arrays = _prefixed("distribution", self.distribution.to_arrays())
        arrays |= _prefixed("semantic", self.semantic.to_arrays())
        if self.last_word is not None:
            arrays |= _prefixed("last_word", self.last_word.to_arrays())
        if self.multiple_choice is not None:
            arrays |= _prefixed("multiple_choice", self.multiple_choice.to_arrays())
        header = {"format": PACK_FORMAT, "settings": self.settings_dict(), "meta": self.meta}
        with atomic_path(Path(path), overwrite) as tmp, open(tmp, "wb") as file:
            # A file object, not a name: numpy would append ".npz" to the temporary name.
            np.savez_compressed(file, header=np.array(json.dumps(header)), **arrays)

    @classmethod
    def load(cls, path: Path) -> ReferencePack:
        """A pack read back from disk: untrusted input, checked before any runtime sees it.

        Memory stays bounded (member sizes from the zip directory and each array's declared shape
        are checked before any array is read), pickled data is never loaded, and every array's
        dtype and shape is checked.
        """
        path = Path(path)
        if path.is_dir():
            raise SrcrError(f"reference pack {path} is a folder; pass the .npz written beside the artifact")
        if not path.is_file():
            raise SrcrError(f"reference pack {path} does not exist; pass the .npz written beside the artifact")
        _check_members(path)
        try:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in stored.files}
        except ValueError:
            # Object arrays were refused above; numpy's other pickle errors mean a file whose first
            # bytes are neither a zip's nor an .npy's (zipfile found the directory at its end).
            raise SrcrError(
                f"{path} is not a readable srcr reference pack (damaged arrays); rebuild it with srcr export"
            ) from None
        except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error, NotImplementedError):
            raise SrcrError(
                f"{path} is not a readable srcr reference pack (damaged file); rebuild it with srcr export"
            ) from None
        header = _header(arrays, path)
        settings = _settings(header.get("settings"), path)
        sections = {name: _section(arrays, name) for name in ("last_word", "multiple_choice")}
        return cls(
            settings=settings,
            distribution=DistributionReference.from_arrays(_section(arrays, "distribution")),
            semantic=SemanticReference.from_arrays(_section(arrays, "semantic")),
            last_word=LastWordReference.from_arrays(sections["last_word"]) if sections["last_word"] else None,
            multiple_choice=(
                MultipleChoiceReference.from_arrays(sections["multiple_choice"])
                if sections["multiple_choice"]
                else None
            ),
            meta=header.get("meta") if isinstance(header.get("meta"), dict) else {},
        )


def _check_members(path: Path) -> None:
    """Refuse a pack whose arrays would take absurd memory, before reading any (only .npy headers)."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            _check_sizes(path, members)
            for member in members:
                with archive.open(member) as stream:
                    _check_npy_header(path, member, stream)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, NotImplementedError):
        # NotImplementedError: a damaged directory entry that claims a zip version newer than Python reads.
        raise SrcrError(f"{path} is not a readable srcr reference pack (damaged file); rebuild it") from None


def _check_sizes(path: Path, members: list[zipfile.ZipInfo]) -> None:
    if len(members) > MAX_PACK_MEMBERS:
        raise SrcrError(f"{path} holds {len(members)} arrays, more than any srcr pack; rebuild it with srcr export")
    total = sum(member.file_size for member in members)
    if total > MAX_PACK_BYTES or any(not member.filename.endswith(".npy") for member in members):
        raise SrcrError(
            f"{path} is not an srcr reference pack ({total / 2**20:.0f} MiB of arrays, or foreign members); "
            "rebuild it with srcr export"
        )
    if any(m.compress_type not in PACK_COMPRESSION or m.flag_bits & UNSUPPORTED_ZIP_FLAGS for m in members):
        raise SrcrError(f"{path} is compressed or encrypted in a way numpy never writes; rebuild it with srcr export")


def _check_npy_header(path: Path, member: zipfile.ZipInfo, stream: Any) -> None:
    """The array a member declares must fit in the member: numpy allocates the declared shape before
    reading, so a 64-byte member claiming 2^40 elements would raise MemoryError (or, for zero-width
    strings, build a list of 2^40 of them). Object arrays are refused here, before numpy sees them."""
    version = np.lib.format.read_magic(stream)  # ValueError: not an .npy (numpy would return raw bytes)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f"npy version {version}")
    if dtype.hasobject:
        raise SrcrError(
            f"{path} is not a readable srcr reference pack (it holds pickled objects, which srcr never loads); "
            "rebuild it with srcr export"
        )
    count = math.prod(shape)
    if any(side < 0 for side in shape) or max(count, count * dtype.itemsize) > member.file_size:
        raise ValueError(f"{member.filename} declares more data than it holds")


def _header(arrays: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    stored = arrays.get("header")
    if stored is None or stored.dtype.kind != "U" or stored.ndim != 0:
        raise SrcrError(f"{path} has no srcr header; rebuild it with srcr export")
    try:
        header = json.loads(str(stored))
    except (ValueError, RecursionError):  # ValueError: also a number of more than 4300 digits
        raise SrcrError(f"{path} has a damaged header; rebuild it with srcr export") from None
    if not isinstance(header, dict) or header.get("format") != PACK_FORMAT:
        found = header.get("format") if isinstance(header, dict) else None
        raise SrcrError(f"{path} is a {found!r} pack, this srcr reads {PACK_FORMAT}; rebuild it with srcr export")
    return header


def _settings(stored: Any, path: Path) -> EvalSettings:
    import pydantic

    try:
        settings = pydantic.TypeAdapter(EvalSettings).validate_python(stored)
        settings.validate()
    except (pydantic.ValidationError, SrcrError):
        raise SrcrError(f"{path} holds damaged evaluation settings; rebuild it with srcr export") from None
    return settings


def build_reference_pack(
    base: Runtime,
    settings: EvalSettings,
    eval_text: str,
    prompts: Sequence[dict[str, str]],
    mc_tasks: Sequence[dict[str, Any]] | None,
    embedder: Embedder,
    progress: ProgressFn = no_progress,
    harness: HarnessRequest | None = None,
) -> ReferencePack:
    """Run the base model over every evaluator's inputs once and keep what scoring needs."""
    settings.validate()
    if not prompts:
        raise SrcrError("the prompt set is empty; keep the built-in prompts or pass a prompts file")
    started = time.perf_counter()
    info = base.info()
    # Token ids are stored, so every runtime sees exactly the BOS choice the base tokenizer makes.
    bos_id = info.get("bos_token_id")
    windows = token_windows(base.tokenize(eval_text), settings.windows, settings.window_len, bos_id)
    distribution = DistributionReference.build(base, windows, settings.top_k, progress)
    semantic = SemanticReference.build(
        base, prompts, settings.max_new_tokens, embedder, settings.chat_template, bos_id, progress
    )
    last_word = None
    if settings.n_last_word:
        last_word = LastWordReference.build(
            base, eval_text, settings.n_last_word, settings.last_word_context, settings.seed, bos_id, progress
        )
    multiple_choice = MultipleChoiceReference.build(base, mc_tasks, bos_id, progress) if mc_tasks else None
    meta = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_runtime": info,
        "bos_token_id": bos_id,
        "eval_text_sha256": hashlib.sha256(eval_text.encode("utf-8")).hexdigest(),
        "prompt_format": semantic.prompt_format,
        "srcr_definition": SRCR_DEFINITION,
    }
    if harness is not None:
        base_tasks = HarnessReference.build(base, bos_id, harness.tasks, harness.include_path, harness.limit, progress)
        meta["harness"] = base_tasks.to_meta()
    meta["build_seconds"] = round(time.perf_counter() - started, 1)
    return ReferencePack(settings, distribution, semantic, last_word, multiple_choice, meta)


def evaluate(
    runtime: Runtime, pack: ReferencePack, embedder: Embedder, progress: ProgressFn = no_progress
) -> dict[str, Any]:
    """Every figure for `runtime` against the pack's base outputs; JSON-serializable."""
    figures, prompt_timing = pack.distribution.score(runtime, progress)
    semantic, generation_timing = pack.semantic.score(runtime, embedder, pack.settings.n_worst, progress)
    figures["semantic"] = semantic
    retention: dict[str, float | None] = {
        "perplexity": perplexity_retention(figures["perplexity"]["base"], figures["perplexity"]["compressed"]),
        "semantic": semantic_retention(semantic["mean"]),
    }
    if pack.last_word is not None:
        figures["last_word"] = pack.last_word.score(runtime, progress)
        retention["last_word"] = accuracy_retention(figures["last_word"]["acc"], figures["last_word"]["base_acc"])
    if pack.multiple_choice is not None:
        mc = pack.multiple_choice.score(runtime, progress)
        figures["multiple_choice"] = mc
        retention["multiple_choice"] = accuracy_retention(mc["acc_norm"], mc["base_acc_norm"], mc["chance"])
    if "harness" in pack.meta:
        bos_id = pack.meta.get("bos_token_id")
        if bos_id is not None and not (isinstance(bos_id, int) and 0 <= bos_id < runtime.vocab_size):
            raise SrcrError("the reference pack's bos_token_id is not a token of this model; rebuild the pack")
        tasks = HarnessReference.from_meta(pack.meta["harness"]).score(runtime, bos_id, progress)
        figures["harness"] = tasks
        for name, task in tasks.items():
            retention[f"lm_eval.{name}"] = accuracy_retention(task["acc"], task["base_acc"], task["chance"])
    figures["retention"] = retention
    figures["sr"] = semantic_retention_score(retention)
    items = item_scores(figures)
    figures["items"] = items.to_dict()
    figures["intervals"] = intervals(items)
    figures["speed"] = {
        "prompt_tokens_per_s": _rate(prompt_timing),
        "generation_tokens_per_s": _rate(generation_timing),
    }
    return figures


def item_scores(figures: dict[str, Any]) -> ItemScores:
    """Collect (and remove) each evaluator's per-item scores from its figures."""
    parts: dict[str, Any] = dict(figures.pop("items"))
    parts.update(figures["semantic"].pop("items"))
    for section in ("last_word", "multiple_choice"):
        if section in figures:
            parts.update(figures[section].pop("items"))
    if "multiple_choice" in figures:
        parts["chance"] = figures["multiple_choice"]["chance"]
    if "harness" in figures:
        parts["tasks"] = {name: task.pop("items") for name, task in figures["harness"].items()}
    return ItemScores.from_dict({**parts, "chance": parts.get("chance", 0.0)})


def _rate(timing: dict) -> float | None:
    return timing["tokens"] / timing["seconds"] if timing["seconds"] > 0 else None
