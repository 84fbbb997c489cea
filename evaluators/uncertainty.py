"""How sure a figure is: per-item scores, bootstrap intervals, and paired differences (docs/metrics.md).

Every evaluator scores items (evaluation windows, prompts, last-word items, multiple-choice items) and
the base model was scored on the very same items, so an interval comes from resampling items with
replacement, base and compressed together (paired), and recomputing the figure: a 95% percentile
interval over `RESAMPLES` draws from a fixed seed, reproducible run to run. Sr resamples each
evaluator's items independently (they are different item sets) and recomputes every retention and
their mean, so its interval carries the uncertainty of all of its parts.

Windows, not tokens, are the items of the distribution figures: tokens of one window are correlated,
and resampling them would claim a resolution the text does not have.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from srcr.evaluators.retention import (
    accuracy_retention,
    perplexity_retention,
    semantic_retention,
    semantic_retention_score,
)

RESAMPLES = 2000
LEVEL = 0.95
SEED = 0


@dataclass(frozen=True)
class TaskItems:
    """One lm-eval task's per-item scores (0/1) for the artifact and the base, and the task's chance rate."""

    scores: np.ndarray
    base_scores: np.ndarray
    chance: float = 0.0


@dataclass(frozen=True)
class ItemScores:
    """Per-item scores of one artifact and of the base model on the same items."""

    window_kl: np.ndarray  # float64 [W]: mean KL to the base over each window's scored tokens
    window_agreement: np.ndarray  # float64 [W]: share of each window's tokens with the base's top token
    window_nll: np.ndarray  # float64 [W]: summed negative log-likelihood of each window's scored tokens
    base_window_nll: np.ndarray  # float64 [W]: the base model's
    tokens_per_window: int
    similarity: np.ndarray  # float64 [P]: cosine of each prompt's generation to the base's
    last_word: np.ndarray | None = None  # bool [N]: item answered
    base_last_word: np.ndarray | None = None
    choice: np.ndarray | None = None  # bool [M]: the length-normalized pick is right (acc_norm)
    base_choice: np.ndarray | None = None
    chance: float = 0.0
    tasks: Mapping[str, TaskItems] | None = None  # lm-eval tasks, by name

    def sizes(self) -> dict[str, int]:
        sizes = {"windows": len(self.window_kl), "prompts": len(self.similarity)}
        if self.last_word is not None:
            sizes["last_word"] = len(self.last_word)
        if self.choice is not None:
            sizes["multiple_choice"] = len(self.choice)
        for name, task in (self.tasks or {}).items():
            sizes[f"lm_eval.{name}"] = len(task.scores)
        return sizes

    def figures(self, draw: Mapping[str, np.ndarray] | None = None) -> dict[str, float | None]:
        """Every figure on the items `draw` picks (indices per item set; all items when None)."""
        pick = _picker(draw)
        windows = pick("windows")
        tokens = self.tokens_per_window * len(self.window_nll[windows])
        perplexity = float(np.exp(self.window_nll[windows].sum() / tokens))
        base_perplexity = float(np.exp(self.base_window_nll[windows].sum() / tokens))
        values: dict[str, float | None] = {
            "kld_mean": float(self.window_kl[windows].mean()),
            "perplexity": perplexity,
            "top1_agreement": float(self.window_agreement[windows].mean()),
            "semantic_mean": float(self.similarity[pick("prompts")].mean()),
            "retention.perplexity": perplexity_retention(base_perplexity, perplexity),
        }
        values["retention.semantic"] = semantic_retention(values["semantic_mean"])
        retentions = {"perplexity": values["retention.perplexity"], "semantic": values["retention.semantic"]}
        if self.last_word is not None and self.base_last_word is not None:
            items = pick("last_word")
            values["last_word_acc"] = float(self.last_word[items].mean())
            retentions["last_word"] = accuracy_retention(
                values["last_word_acc"], float(self.base_last_word[items].mean())
            )
            values["retention.last_word"] = retentions["last_word"]
        if self.choice is not None and self.base_choice is not None:
            items = pick("multiple_choice")
            values["multiple_choice_acc_norm"] = float(self.choice[items].mean())
            base = float(self.base_choice[items].mean())
            retentions["multiple_choice"] = accuracy_retention(values["multiple_choice_acc_norm"], base, self.chance)
            values["retention.multiple_choice"] = retentions["multiple_choice"]
        for name, task in (self.tasks or {}).items():
            items = pick(f"lm_eval.{name}")
            values[f"lm_eval.{name}"] = float(task.scores[items].mean())
            base = float(task.base_scores[items].mean())
            retentions[f"lm_eval.{name}"] = accuracy_retention(values[f"lm_eval.{name}"], base, task.chance)
            values[f"retention.lm_eval.{name}"] = retentions[f"lm_eval.{name}"]
        values["sr"] = semantic_retention_score(retentions)
        return values

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            out[field.name] = value.tolist() if isinstance(value, np.ndarray) else value
        if self.tasks is not None:
            out["tasks"] = {
                name: {"scores": task.scores.tolist(), "base_scores": task.base_scores.tolist(), "chance": task.chance}
                for name, task in self.tasks.items()
            }
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ItemScores:
        """From a manifest (already type-checked by its schema): the item sets must agree in length."""
        floats = {name: np.asarray(data[name], dtype=np.float64) for name in _FLOAT_ARRAYS}
        flags = {name: None if data.get(name) is None else np.asarray(data[name], dtype=bool) for name in _FLAG_ARRAYS}
        tasks = None
        if data.get("tasks") is not None:
            tasks = {
                str(name): TaskItems(
                    np.asarray(task["scores"], dtype=np.float64),
                    np.asarray(task["base_scores"], dtype=np.float64),
                    float(task["chance"]),
                )
                for name, task in data["tasks"].items()
            }
            if any(len(task.scores) != len(task.base_scores) or len(task.scores) < 1 for task in tasks.values()):
                raise ValueError("an lm-eval task's scores and base scores do not cover the same items")
        items = cls(
            **floats,
            **flags,
            tokens_per_window=int(data["tokens_per_window"]),
            chance=float(data["chance"]),
            tasks=tasks,
        )
        windows = len(items.window_kl)
        if any(len(floats[name]) != windows for name in _FLOAT_ARRAYS if name.startswith(("window", "base_window"))):
            raise ValueError("the per-window scores differ in length")
        for first, second in (("last_word", "base_last_word"), ("choice", "base_choice")):
            if (flags[first] is None) != (flags[second] is None) or (
                flags[first] is not None and len(flags[first]) != len(flags[second])
            ):
                raise ValueError(f"{first} and {second} do not cover the same items")
        if windows < 1 or len(items.similarity) < 1 or items.tokens_per_window < 1:
            raise ValueError("per-item scores need at least one window and one prompt")
        return items


_FLOAT_ARRAYS = ("window_kl", "window_agreement", "window_nll", "base_window_nll", "similarity")
_FLAG_ARRAYS = ("last_word", "base_last_word", "choice", "base_choice")


def _picker(draw: Mapping[str, np.ndarray] | None):
    def pick(name: str) -> Any:
        return slice(None) if draw is None else draw[name]

    return pick


def _draws(sizes: Mapping[str, int], resamples: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: rng.integers(0, size, size) for name, size in sizes.items()} for _ in range(resamples)]


def intervals(items: ItemScores, resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, list[float]]:
    """{figure: [low, high]}: the 95% percentile bootstrap interval of every figure the items define."""
    samples: dict[str, list[float]] = {}
    for draw in _draws(items.sizes(), resamples, seed):
        for name, value in items.figures(draw).items():
            if value is not None:
                samples.setdefault(name, []).append(value)
    return {name: _percentiles(values) for name, values in samples.items()}


@dataclass(frozen=True)
class Difference:
    """`figure` of A minus that of B on the same items, with its paired 95% interval."""

    figure: str
    value: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero: a difference, not item noise."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict[str, Any]:
        """What tables and --json show: value, low, high, significant."""
        return {"value": self.value, "low": self.low, "high": self.high, "significant": self.significant}


def paired_difference(
    first: ItemScores,
    second: ItemScores,
    figure: str = "sr",
    scales: tuple[float, float] = (1.0, 1.0),
    resamples: int = RESAMPLES,
    seed: int = SEED,
) -> Difference:
    """`figure` × scale of `first` minus that of `second` (scales: each artifact's TCr turns Sr into SrCr),
    both resampled with the same item draws, so the noise the items share cancels."""
    if first.sizes() != second.sizes():
        raise ValueError("the two artifacts were not scored on the same items (different reference packs)")
    value = _difference(first.figures(), second.figures(), figure, scales)
    differences = []
    for draw in _draws(first.sizes(), resamples, seed):
        difference = _difference(first.figures(draw), second.figures(draw), figure, scales)
        if difference is not None:
            differences.append(difference)
    if value is None or not differences:
        raise ValueError(f"{figure} is not defined for both artifacts")
    low, high = _percentiles(differences)
    return Difference(figure, value, low, high)


def _difference(
    first: Mapping[str, float | None], second: Mapping[str, float | None], figure: str, scales: tuple[float, float]
) -> float | None:
    a, b = first.get(figure), second.get(figure)
    return None if a is None or b is None else a * scales[0] - b * scales[1]


def _percentiles(values: list[float]) -> list[float]:
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(np.asarray(values, dtype=np.float64), [tail, 100 - tail])
    return [float(low), float(high)]


def items_needed(current: int, current_half_width: float, wanted_half_width: float) -> int:
    """Items for a wanted half-width, from the 1/sqrt(n) law an interval of a mean follows."""
    return int(np.ceil(current * (current_half_width / wanted_half_width) ** 2))
