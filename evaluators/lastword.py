"""Last-word prediction (LAMBADA-style) on the held-out text.

Items are built automatically: a sentence that ends in a lower-case word of three or more
letters becomes one item, with the text of its document up to that word as context. An item is
correct when the model's greedy choice reproduces every token of " word" (teacher-forced argmax,
which is exactly greedy generation of the word's tokens).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.evaluators import pack_checks as check
from srcr.evaluators.ragged import checked_ragged, pack_ragged

# A whole lower-case word right before the sentence's final punctuation (optionally closed by a
# quote or bracket). Lower case keeps out abbreviations ("Inc.", "Jan.") and unguessable names.
_SENTENCE_FINAL_WORD = re.compile(r"(?<=\s)([a-z]{3,})[.!?][\"')\]]*(?=\s|$)")
MIN_CONTEXT_TOKENS = 16


@dataclass
class LastWordItem:
    context: list[int]
    target: list[int]
    word: str


def _candidates(text: str) -> list[tuple[str, str]]:
    """(context text, word) for every sentence-final word; one document per non-empty line."""
    found = []
    for document in text.splitlines():
        for match in _SENTENCE_FINAL_WORD.finditer(document):
            found.append((document[: match.start(1)].rstrip(), match.group(1)))
    return found


def last_word_items(
    text: str,
    tokenize: Callable[[str], list[int]],
    n_items: int,
    max_context_tokens: int,
    seed: int,
    bos_id: int | None = None,
) -> list[LastWordItem]:
    """Up to `n_items` items drawn at random (seeded) from the text's sentences, in text order."""
    candidates = list(enumerate(_candidates(text)))
    random.Random(seed).shuffle(candidates)
    chosen: list[tuple[int, LastWordItem]] = []
    for position, (context_text, word) in candidates:
        if len(chosen) == n_items:
            break
        context = tokenize(context_text)
        whole = tokenize(f"{context_text} {word}")
        # Keep only items whose context tokenizes the same alone as it does before the word.
        if len(context) < MIN_CONTEXT_TOKENS or len(whole) <= len(context) or whole[: len(context)] != context:
            continue
        kept = ([bos_id] if bos_id is not None else []) + context[-max_context_tokens:]
        chosen.append((position, LastWordItem(context=kept, target=whole[len(context) :], word=word)))
    return [item for _, item in sorted(chosen, key=lambda pair: pair[0])]


def greedy_match(runtime: Runtime, item: LastWordItem) -> bool:
    """Whether the runtime's argmax, fed the true prefix, reproduces every target token."""
    logprobs = runtime.logprobs(item.context + item.target[:-1], first_row=len(item.context) - 1)
    predicted = logprobs.argmax(-1)
    return predicted.tolist() == item.target


def _accuracy(runtime: Runtime, items: list[LastWordItem], label: str, progress: ProgressFn) -> np.ndarray:
    correct = np.zeros(len(items), dtype=bool)
    for index, item in enumerate(items):
        progress(label, index, len(items))
        correct[index] = greedy_match(runtime, item)
    progress(label, len(items), len(items))
    return correct


@dataclass
class LastWordReference:
    items: list[LastWordItem]
    base_correct: np.ndarray  # bool [n]

    @property
    def base_accuracy(self) -> float:
        return float(self.base_correct.mean())

    @classmethod
    def build(
        cls,
        base: Runtime,
        text: str,
        n_items: int,
        max_context_tokens: int,
        seed: int,
        bos_id: int | None,
        progress: ProgressFn = no_progress,
    ) -> LastWordReference:
        items = last_word_items(text, base.tokenize, n_items, max_context_tokens, seed, bos_id)
        if not items:
            raise SrcrError(
                "no last-word items could be built from the evaluation text; "
                "pass a longer text with complete sentences or set the last-word item count to 0"
            )
        return cls(items=items, base_correct=_accuracy(base, items, "reference: last word", progress))

    def score(self, runtime: Runtime, progress: ProgressFn = no_progress) -> dict:
        correct = _accuracy(runtime, self.items, "last word", progress)
        return {
            "acc": float(correct.mean()),
            "base_acc": self.base_accuracy,
            "n": len(self.items),
            "items": {"last_word": correct.tolist(), "base_last_word": self.base_correct.tolist()},
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        context_values, context_offsets = pack_ragged([item.context for item in self.items])
        target_values, target_offsets = pack_ragged([item.target for item in self.items])
        return {
            "contexts": context_values,
            "context_offsets": context_offsets,
            "targets": target_values,
            "target_offsets": target_offsets,
            "words": np.array([item.word for item in self.items], dtype=np.str_),
            "base_correct": self.base_correct,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> LastWordReference:
        """The section as read from a pack; every item needs context and a target."""
        words = check.strings(arrays, "words")
        contexts = checked_ragged(arrays, "contexts", "context_offsets", len(words))
        targets = checked_ragged(arrays, "targets", "target_offsets", len(words))
        if any(not context for context in contexts) or any(not target for target in targets):
            raise check.fail("contexts", "hold an item without context or target tokens")
        base_correct = check.array(arrays, "base_correct", "b", 1)
        check.shape("base_correct", base_correct, (len(words),))
        items = [LastWordItem(c, t, w) for c, t, w in zip(contexts, targets, words, strict=True)]
        return cls(items=items, base_correct=base_correct.astype(bool))
