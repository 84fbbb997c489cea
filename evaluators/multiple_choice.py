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

from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.evaluators import pack_checks as check
from srcr.evaluators.ragged import checked_ragged, pack_ragged


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
    rows, targets = continuation_rows(runtime, sequence, n_continuation)
    return float(rows[np.arange(n_continuation), targets].astype(np.float64).sum())


def continuation_rows(runtime: Runtime, sequence: Sequence[int], n_continuation: int) -> tuple[np.ndarray, np.ndarray]:
    """(log-probability rows that predict the last `n_continuation` tokens of `sequence`, those tokens)."""
    rows = runtime.logprobs(list(sequence[:-1]), first_row=len(sequence) - 1 - n_continuation)
    return rows, np.asarray(sequence[len(sequence) - n_continuation :], dtype=np.int64)


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
        correct, correct_norm = self.correct(logliks)
        return float(correct.mean()), float(correct_norm.mean())

    def correct(self, logliks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per item, whether the raw and the length-normalized pick is the answer."""
        normalized = logliks / self.choice_chars
        spans = zip(self.choice_offsets[:-1], self.choice_offsets[1:], strict=True)
        picks = [(np.argmax(logliks[a:b]), np.argmax(normalized[a:b])) for a, b in spans]
        correct = np.array([pick == answer for (pick, _), answer in zip(picks, self.answers, strict=True)])
        correct_norm = np.array([pick == answer for (_, pick), answer in zip(picks, self.answers, strict=True)])
        return correct, correct_norm

    def score(self, runtime: Runtime, progress: ProgressFn = no_progress) -> dict:
        # A sequence's last token is only a target: it indexes the logits without passing the runtime's check.
        for sequence in self.sequences:
            check.within_vocabulary("sequences", np.asarray(sequence), runtime.vocab_size)
        correct, correct_norm = self.correct(self.logliks(runtime, "multiple choice", progress))
        base_correct, base_correct_norm = self.correct(self.base_logliks)
        return {
            "acc": float(correct.mean()),
            "acc_norm": float(correct_norm.mean()),
            "base_acc": float(base_correct.mean()),
            "base_acc_norm": float(base_correct_norm.mean()),
            "chance": self.chance,
            "n": len(self.answers),
            "items": {"choice": correct_norm.tolist(), "base_choice": base_correct_norm.tolist()},
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
        """The section as read from a pack: choices, tasks and answers checked against each other."""
        sequences = checked_ragged(arrays, "sequences", "sequence_offsets", None)
        count = len(sequences)
        lengths = check.array(arrays, "continuation_lengths", "iu", 1)
        check.shape("continuation_lengths", lengths, (count,))
        if any(not 1 <= int(n) < len(sequence) for n, sequence in zip(lengths, sequences, strict=True)):
            raise check.fail("continuation_lengths", "do not fit their sequences")
        chars = check.array(arrays, "choice_chars", "iu", 1)
        check.shape("choice_chars", chars, (count,))
        # Stored as int32: a count of 2^32 would wrap to 0 and divide acc_norm's log-likelihoods by zero.
        if count and (chars.min() < 1 or chars.max() >= 1 << 31):
            raise check.fail("choice_chars", "hold a choice of no characters, or of more than 2^31")
        offsets = check.offsets(arrays, "choice_offsets", count)
        tasks = offsets.shape[0] - 1
        choices = np.diff(offsets)
        if tasks < 1 or choices.min() < 2:
            raise check.fail("choice_offsets", "describe a task with fewer than two choices")
        answers = check.array(arrays, "answers", "iu", 1)
        check.shape("answers", answers, (tasks,))
        if np.any(answers < 0) or np.any(answers >= choices):
            raise check.fail("answers", "point outside their task's choices")
        logliks = check.array(arrays, "base_logliks", "f", 1)
        check.shape("base_logliks", logliks, (count,))
        return cls(
            sequences=sequences,
            continuation_lengths=lengths.astype(np.int32),
            choice_chars=chars.astype(np.int32),
            choice_offsets=offsets,
            answers=answers.astype(np.int32),
            base_logliks=logliks.astype(np.float64),
        )
