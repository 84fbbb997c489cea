"""Re-measured figures against the ones recorded at export time, within stated tolerances.

The same artifact run again (another machine, another execution provider, CPU vs GPU) gives
slightly different logits; a near-tie can flip a greedy token or a top-1 choice. The tolerances
below absorb that noise and nothing more (docs/metrics.md explains each one).
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


@dataclass(frozen=True)
class FigureCheck:
    name: str
    expected: float
    measured: float | None  # None: the re-run did not produce this figure
    drift: float | None  # measured - expected
    tolerance: float  # the largest |drift| accepted
    ok: bool


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
) -> list[FigureCheck]:
    """One check per toleranced figure that the expected figures contain (a bare float = absolute)."""
    checks = []
    for name, limit in tolerances.items():
        tolerance = limit if isinstance(limit, Tolerance) else Tolerance(absolute=float(limit))
        want = figure(expected, name)
        if want is None:
            continue
        got = figure(measured, name)
        allowed = tolerance.allowed(want)
        if got is None or not math.isfinite(got):
            checks.append(FigureCheck(name, want, got, None, allowed, False))
            continue
        drift = got - want
        checks.append(FigureCheck(name, want, got, drift, allowed, abs(drift) <= allowed))
    return checks
