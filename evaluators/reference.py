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
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from evaluators.distribution import DistributionReference, token_windows
from evaluators.lastword import LastWordReference
from evaluators.multiple_choice import MultipleChoiceReference
from evaluators.retention import (
    SRCR_DEFINITION,
    accuracy_retention,
    perplexity_retention,
    semantic_retention,
    semantic_retention_score,
)
from evaluators.semantic import Embedder, SemanticReference
from exporter.atomic import atomic_path
from exporter.errors import SrcrError
from targets.base import ProgressFn, Runtime, no_progress

PACK_FORMAT = "srcr-reference/v1"


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


def _prefixed(prefix: str, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{prefix}.{key}": value for key, value in arrays.items()}


def _section(arrays: Any, prefix: str) -> dict[str, np.ndarray]:
    start = f"{prefix}."
    return {key[len(start) :]: arrays[key] for key in arrays.files if key.startswith(start)}


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
        path = Path(path)
        if not path.is_file():
            raise SrcrError(f"reference pack {path} does not exist; pass the .npz written beside the artifact")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                header = json.loads(str(arrays["header"]))
                if header.get("format") != PACK_FORMAT:
                    raise SrcrError(
                        f"{path} is a {header.get('format')!r} pack, this srcr reads {PACK_FORMAT}; "
                        "rebuild it with srcr export"
                    )
                sections = {name: _section(arrays, name) for name in ("last_word", "multiple_choice")}
                return cls(
                    settings=EvalSettings(**header["settings"]),
                    distribution=DistributionReference.from_arrays(_section(arrays, "distribution")),
                    semantic=SemanticReference.from_arrays(_section(arrays, "semantic")),
                    last_word=LastWordReference.from_arrays(sections["last_word"]) if sections["last_word"] else None,
                    multiple_choice=(
                        MultipleChoiceReference.from_arrays(sections["multiple_choice"])
                        if sections["multiple_choice"]
                        else None
                    ),
                    meta=header.get("meta", {}),
                )
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as error:
            raise SrcrError(
                f"{path} is not a readable srcr reference pack ({error}); rebuild it with srcr export"
            ) from None


def build_reference_pack(
    base: Runtime,
    settings: EvalSettings,
    eval_text: str,
    prompts: Sequence[dict[str, str]],
    mc_tasks: Sequence[dict[str, Any]] | None,
    embedder: Embedder,
    progress: ProgressFn = no_progress,
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
        "build_seconds": round(time.perf_counter() - started, 1),
    }
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
    figures["retention"] = retention
    figures["sr"] = semantic_retention_score(retention)
    figures["speed"] = {
        "prompt_tokens_per_s": _rate(prompt_timing),
        "generation_tokens_per_s": _rate(generation_timing),
    }
    return figures


def _rate(timing: dict) -> float | None:
    return timing["tokens"] / timing["seconds"] if timing["seconds"] > 0 else None
