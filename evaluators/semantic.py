"""Semantic similarity of greedy generations: base vs compressed, by sentence-embedding cosine.

Each prompt gets a fixed-length greedy continuation from both models; the two continuations (new
text only, not the prompt) are embedded with all-MiniLM-L6-v2 and compared by cosine similarity.
The base side (token ids, text, embedding) lives in the reference pack.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.evaluators import pack_checks as check
from srcr.evaluators.ragged import checked_ragged, pack_ragged


@runtime_checkable
class ChatPrompting(Protocol):
    """Optional runtime capability: token ids of a prompt wrapped in the model's chat template."""

    def chat_tokens(self, prompt: str) -> list[int] | None:
        """None when the model has no chat template."""
        ...


class Embedder(Protocol):
    """The part of sentence_transformers.SentenceTransformer the evaluator uses."""

    def encode(self, sentences: list[str], **kwargs: Any) -> Any: ...


def embed(embedder: Embedder, texts: Sequence[str]) -> np.ndarray:
    """float32 [len(texts), D], unit length, so a dot product is the cosine similarity."""
    vectors = embedder.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)


def prompt_tokens(runtime: Runtime, prompt: str, use_chat_template: bool, bos_id: int | None) -> tuple[list[int], str]:
    """(token ids, "chat" | "plain"): the chat template when asked for and available, else plain text."""
    if use_chat_template and isinstance(runtime, ChatPrompting):
        tokens = runtime.chat_tokens(prompt)
        if tokens is not None:
            return tokens, "chat"
    return ([bos_id] if bos_id is not None else []) + runtime.tokenize(prompt), "plain"


@dataclass
class SemanticReference:
    ids: list[str]
    prompts: list[str]
    prompt_tokens: list[list[int]]
    base_tokens: list[list[int]]
    base_texts: list[str]
    base_embeddings: np.ndarray  # float32 [P, D], unit length
    max_new_tokens: int
    prompt_format: str  # "chat" or "plain"

    @classmethod
    def build(
        cls,
        base: Runtime,
        prompts: Sequence[dict[str, str]],
        max_new_tokens: int,
        embedder: Embedder,
        use_chat_template: bool,
        bos_id: int | None,
        progress: ProgressFn = no_progress,
    ) -> SemanticReference:
        encoded = [prompt_tokens(base, item["prompt"], use_chat_template, bos_id) for item in prompts]
        formats = {prompt_format for _, prompt_format in encoded}
        tokens = [ids for ids, _ in encoded]
        generations = []
        for index, ids in enumerate(tokens):
            progress("reference: generations", index, len(tokens))
            generations.append(base.generate(ids, max_new_tokens))
        progress("reference: generations", len(tokens), len(tokens))
        texts = [base.detokenize(generation) for generation in generations]
        return cls(
            ids=[item["id"] for item in prompts],
            prompts=[item["prompt"] for item in prompts],
            prompt_tokens=tokens,
            base_tokens=generations,
            base_texts=texts,
            base_embeddings=embed(embedder, texts),
            max_new_tokens=max_new_tokens,
            prompt_format=formats.pop() if len(formats) == 1 else "mixed",
        )

    def score(
        self, runtime: Runtime, embedder: Embedder, n_worst: int, progress: ProgressFn = no_progress
    ) -> tuple[dict, dict]:
        """(figures, timing) of `runtime`'s generations against the base generations."""
        generations, seconds = [], 0.0
        for index, ids in enumerate(self.prompt_tokens):
            progress("generations", index, len(self.prompt_tokens))
            start = time.perf_counter()
            generations.append(runtime.generate(ids, self.max_new_tokens))
            seconds += time.perf_counter() - start
        progress("generations", len(self.prompt_tokens), len(self.prompt_tokens))
        texts = [runtime.detokenize(generation) for generation in generations]
        embeddings = embed(embedder, texts)
        # The pack cannot know the embedder's width: (P, 1) would even broadcast into a wrong cosine.
        check.shape("base_embeddings", self.base_embeddings, embeddings.shape)
        similarity = (embeddings * self.base_embeddings).sum(-1).astype(np.float64)
        worst = np.argsort(similarity, kind="stable")[:n_worst]
        figures = {
            "items": {"similarity": similarity.tolist()},
            "mean": float(similarity.mean()),
            "min": float(similarity.min()),
            "identical": float(np.mean([a == b for a, b in zip(generations, self.base_tokens, strict=True)])),
            "worst": [
                {
                    "id": self.ids[i],
                    "similarity": float(similarity[i]),
                    "base": self.base_texts[i],
                    "compressed": texts[i],
                }
                for i in worst
            ],
        }
        timing = {"tokens": sum(len(generation) for generation in generations), "seconds": seconds}
        return figures, timing

    def to_arrays(self) -> dict[str, np.ndarray]:
        prompt_values, prompt_offsets = pack_ragged(self.prompt_tokens)
        base_values, base_offsets = pack_ragged(self.base_tokens)
        return {
            "ids": np.array(self.ids, dtype=np.str_),
            "prompts": np.array(self.prompts, dtype=np.str_),
            "prompt_tokens": prompt_values,
            "prompt_offsets": prompt_offsets,
            "base_tokens": base_values,
            "base_offsets": base_offsets,
            "base_texts": np.array(self.base_texts, dtype=np.str_),
            "base_embeddings": self.base_embeddings,
            "max_new_tokens": np.array(self.max_new_tokens),
            "prompt_format": np.array(self.prompt_format),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SemanticReference:
        """The section as read from a pack, every array checked against the prompt count."""
        ids = check.strings(arrays, "ids")
        count = len(ids)
        if count < 1:
            raise check.fail("ids", "is empty; a pack needs at least one prompt")
        embeddings = check.array(arrays, "base_embeddings", "f", 2)
        if embeddings.shape[0] != count or not np.all(np.isfinite(embeddings)):
            raise check.fail(
                "base_embeddings", f"has shape {embeddings.shape} or non-finite values; expected ({count}, D)"
            )
        prompt_format = check.array(arrays, "prompt_format", "U", 0)
        return cls(
            ids=ids,
            prompts=check.strings(arrays, "prompts", count),
            prompt_tokens=checked_ragged(arrays, "prompt_tokens", "prompt_offsets", count),
            base_tokens=checked_ragged(arrays, "base_tokens", "base_offsets", count),
            base_texts=check.strings(arrays, "base_texts", count),
            base_embeddings=embeddings.astype(np.float32),
            max_new_tokens=check.scalar_int(arrays, "max_new_tokens", 1, 1 << 16),
            prompt_format=str(prompt_format),
        )
