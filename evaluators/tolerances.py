"""Re-measured figures against the ones recorded at export time, within stated tolerances.

The same artifact run again (another machine, another execution provider, CPU vs GPU) gives
slightly different logits; a near-tie can flip a greedy token or a top-1 choice. The tolerances
below absorb that noise and nothing more (docs/metrics.md explains each one).

Two modes (docs/verify.md): `drift` (the default) accepts |measured − recorded| ≤ tolerance: the
re-run scores the very same items, so item sampling adds nothing and only the runtime's drift is
allowed. `interval` accepts a measured value inside the manifest's 95% item-bootstrap interval widened
by the tolerance: the question "is this within what the export could claim at all", for figures
whose recorded value is itself uncertain, at the price of passing changes up to the interval's width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tolerance:
    absolute: float = 0.0
    relative: float = 0.0  # of |expected|

    def allowed(self, expected: float) -> float:
        return self.absolute + self.relative * abs(expected)


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "sr": Tolerance(absolute=0.02),
    "perplexity.compressed": Tolerance(relative=0.02),
    "kld.mean": Tolerance(absolute=0.005, relative=0.10),
    "top1_agreement": Tolerance(absolute=0.01),
    "semantic.mean": Tolerance(absolute=0.02),
    "last_word.acc": Tolerance(absolute=0.03),
    "multiple_choice.acc_norm": Tolerance(absolute=0.03),
}
TASK_TOLERANCE = Tolerance(absolute=0.03)  # each lm-eval task's accuracy (`harness.<task>.acc`)


MODES = ("drift", "interval")
# Tolerance names -> the figure names of the manifest's `evaluation.intervals`.
INTERVAL_NAMES = {
    "sr": "sr",
    "perplexity.compressed": "perplexity",
    "kld.mean": "kld_mean",
    "top1_agreement": "top1_agreement",
    "semantic.mean": "semantic_mean",
    "last_word.acc": "last_word_acc",
    "multiple_choice.acc_norm": "multiple_choice_acc_norm",
}


def interval_name(name: str) -> str:
    """A tolerance's figure as `evaluation.intervals` names it (`harness.<task>.acc` -> `lm_eval.<task>`)."""
    if name.startswith("harness.") and name.endswith(".acc"):
        return f"lm_eval.{name.removeprefix('harness.').removesuffix('.acc')}"
    return INTERVAL_NAMES.get(name, name)


@dataclass(frozen=True)
class FigureCheck:
    name: str
    expected: float
    measured: float | None  # None: the re-run did not produce this figure
    drift: float | None  # measured - expected
    tolerance: float  # the largest |drift| accepted (drift mode), or the widening of the interval
    ok: bool
    accepted: tuple[float, float] | None = None  # interval mode: the range the measured value had to fall in


def figure(figures: Mapping[str, Any], dotted_name: str) -> float | None:
    """figures["a"]["b"] for "a.b"; None when absent."""
    value: Any = figures
    for key in dotted_name.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return None if value is None else float(value)


def compare_figures(
    expected: Mapping[str, Any],
    measured: Mapping[str, Any],
    tolerances: Mapping[str, Tolerance | float] = DEFAULT_TOLERANCES,
    intervals: Mapping[str, Any] | None = None,
) -> list[FigureCheck]:
    """One check per toleranced figure that the expected figures contain (a bare float = absolute).

    With `intervals` (the manifest's), a figure that has one is checked in interval mode."""
    checks = []
    for name, limit in tolerances.items():
        tolerance = limit if isinstance(limit, Tolerance) else Tolerance(absolute=float(limit))
        want = figure(expected, name)
        if want is None:
            continue
        got = figure(measured, name)
        allowed = tolerance.allowed(want)
        interval = (intervals or {}).get(interval_name(name))
        accepted = (interval[0] - allowed, interval[1] + allowed) if interval is not None else None
        if got is None or not math.isfinite(got):
            checks.append(FigureCheck(name, want, got, None, allowed, False, accepted))
            continue
        drift = got - want
        ok = accepted[0] <= got <= accepted[1] if accepted is not None else abs(drift) <= allowed
        checks.append(FigureCheck(name, want, got, drift, allowed, ok, accepted))
    return checks
