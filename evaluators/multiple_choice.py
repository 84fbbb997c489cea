"""User multiple-choice tasks, scored like lm-evaluation-harness: the log-likelihood of each choice.

`acc` picks the choice with the highest summed log-probability of its tokens after the context;
`acc_norm` divides that sum by the choice's length in characters first, which removes the bias
towards short choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evaluators.ragged import pack_ragged, unpack_ragged
from targets.base import ProgressFn, Runtime, no_progress


def encode_choice(
    tokenize: Callable[[str], list[int]], context: str, choice: str, bos_id: int | None = None
) -> tuple[list[int], int]:
    """(context + continuation token ids, number of continuation tokens) for one choice.

    Context and choice are joined by one space unless either side already has whitespace there;
    trailing whitespace of the context moves into the continuation, and the split is taken from
    the tokenization of the whole string, as lm-evaluation-harness does.
    """
    delimiter = "" if context[-1:].isspace() or choice[:1].isspace() else " "
    stripped = context.rstrip()
    continuation = (context + delimiter + choice)[len(stripped) :]
    context_ids = tokenize(stripped)
    whole = tokenize(stripped + continuation)
    if whole[: len(context_ids)] == context_ids and len(whole) > len(context_ids):
        continuation_ids = whole[len(context_ids) :]
    else:
        continuation_ids = tokenize(continuation)
    prefix = [bos_id] if bos_id is not None else []
    return prefix + context_ids + continuation_ids, len(continuation_ids)


def continuation_loglik(runtime: Runtime, sequence: Sequence[int], n_continuation: int) -> float:
    """Summed log-probability of the last `n_continuation` tokens of `sequence` given the rest."""
    logprobs = runtime.logprobs(list(sequence[:-1]))
    rows = logprobs[len(sequence) - 1 - n_continuation :]
    targets = np.asarray(sequence[len(sequence) - n_continuation :], dtype=np.int64)
    return float(rows[np.arange(n_continuation), targets].astype(np.float64).sum())


@dataclass
class MultipleChoiceReference:
    sequences: list[list[int]]  # one per (item, choice), items in order
    continuation_lengths: np.ndarray  # int32 [C]
    choice_chars: np.ndarray  # int32 [C]: the choice's length in characters, for acc_norm
    choice_offsets: np.ndarray  # int64 [I + 1]: item i owns rows choice_offsets[i] : choice_offsets[i + 1]
    answers: np.ndarray  # int32 [I]
    base_logliks: np.ndarray  # float64 [C]

    @property
    def chance(self) -> float:
        return float(np.mean(1.0 / np.diff(self.choice_offsets)))

    @classmethod
    def build(
        cls,
        base: Runtime,
        tasks: Sequence[dict[str, Any]],
        bos_id: int | None,
        progress: ProgressFn = no_progress,
    ) -> MultipleChoiceReference:
        sequences, lengths, chars, offsets = [], [], [], [0]
        for task in tasks:
            for choice in task["choices"]:
                sequence, n_continuation = encode_choice(base.tokenize, task["context"], choice, bos_id)
                sequences.append(sequence)
                lengths.append(n_continuation)
                chars.append(len(choice))
            offsets.append(len(sequences))
        reference = cls(
            sequences=sequences,
            continuation_lengths=np.array(lengths, dtype=np.int32),
            choice_chars=np.array(chars, dtype=np.int32),
            choice_offsets=np.array(offsets, dtype=np.int64),
            answers=np.array([task["answer"] for task in tasks], dtype=np.int32),
            base_logliks=np.zeros(len(sequences)),
        )
        reference.base_logliks = reference.logliks(base, "reference: multiple choice", progress)
        return reference

    def logliks(self, runtime: Runtime, label: str, progress: ProgressFn = no_progress) -> np.ndarray:
        values = np.zeros(len(self.sequences))
        for index, (sequence, n_continuation) in enumerate(zip(self.sequences, self.continuation_lengths, strict=True)):
            progress(label, index, len(self.sequences))
            values[index] = continuation_loglik(runtime, sequence, int(n_continuation))
        progress(label, len(self.sequences), len(self.sequences))
        return values

    def accuracies(self, logliks: np.ndarray) -> tuple[float, float]:
        """(acc, acc_norm) of the choices these log-likelihoods pick."""
        normalized = logliks / self.choice_chars
        spans = zip(self.choice_offsets[:-1], self.choice_offsets[1:], strict=True)
        picks = [(np.argmax(logliks[a:b]), np.argmax(normalized[a:b])) for a, b in spans]
        acc = np.mean([pick == answer for (pick, _), answer in zip(picks, self.answers, strict=True)])
        acc_norm = np.mean([pick == answer for (_, pick), answer in zip(picks, self.answers, strict=True)])
        return float(acc), float(acc_norm)

    def score(self, runtime: Runtime, progress: ProgressFn = no_progress) -> dict:
        acc, acc_norm = self.accuracies(self.logliks(runtime, "multiple choice", progress))
        base_acc, base_acc_norm = self.accuracies(self.base_logliks)
        return {
            "acc": acc,
            "acc_norm": acc_norm,
            "base_acc": base_acc,
            "base_acc_norm": base_acc_norm,
            "chance": self.chance,
            "n": len(self.answers),
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        values, offsets = pack_ragged(self.sequences)
        return {
            "sequences": values,
            "sequence_offsets": offsets,
            "continuation_lengths": self.continuation_lengths,
            "choice_chars": self.choice_chars,
            "choice_offsets": self.choice_offsets,
            "answers": self.answers,
            "base_logliks": self.base_logliks,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> MultipleChoiceReference:
        return cls(
            sequences=unpack_ragged(arrays["sequences"], arrays["sequence_offsets"]),
            continuation_lengths=arrays["continuation_lengths"],
            choice_chars=arrays["choice_chars"],
            choice_offsets=arrays["choice_offsets"],
            answers=arrays["answers"],
            base_logliks=arrays["base_logliks"],
        )
