"""Choosing one storage option per tensor so that the file fits a byte budget at the least predicted loss.

Pure arithmetic, shared by every target: a target lists each tensor's options (its bytes and predicted
cost, e.g. mean KL), and `allocate` solves the multiple-choice knapsack by the Lagrangian walk along
each tensor's lower convex hull (the cheapest loss per byte first), then spends what is left on the
best single upgrades that still fit. The predicted cost of a tensor's option is its sensitivity (mean
KL per unit of relative error, measured on the calibration data) times its relative error.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from srcr.base.errors import SrcrError


@dataclass(frozen=True)
class Option:
    label: str  # the format's name for it, e.g. "Q4_K"
    bytes: int
    cost: float  # predicted loss (mean KL) this tensor adds when stored this way


def relative_error(weight: np.ndarray, approximation: np.ndarray, importance: np.ndarray | None) -> float:
    """sum_j w_j |W[:, j] - Ŵ[:, j]|² / sum_j w_j |W[:, j]|²: the layer's output error under inputs whose
    column j has mean square w_j (the importance matrix), ignoring their correlations; w = 1 without one."""
    difference = np.square(weight - approximation, dtype=np.float64).sum(axis=0)
    energy = np.square(weight, dtype=np.float64).sum(axis=0)
    if importance is not None:
        difference = difference * importance
        energy = energy * importance
    total = float(energy.sum())
    return float(difference.sum()) / total if total > 0 else 0.0


def _hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, cost), from fewest bytes to most, each one cheaper
    in cost than the one before: every other option is beaten by a mix of two hull neighbours."""
    by_bytes = sorted(options, key=lambda option: (option.bytes, option.cost))
    frontier: list[Option] = []
    for option in by_bytes:
        if frontier and option.cost >= frontier[-1].cost:
            continue  # more bytes for no less loss
        while len(frontier) >= 2 and _slope(frontier[-2], frontier[-1]) >= _slope(frontier[-1], option):
            frontier.pop()
        frontier.append(option)
    return frontier


def _slope(low: Option, high: Option) -> float:
    return (high.cost - low.cost) / max(high.bytes - low.bytes, 1)


def allocate(options: Mapping[str, Sequence[Option]], budget: int) -> dict[str, Option]:
    """One option per tensor, at most `budget` bytes in all, minimising the summed cost (greedy on the
    hulls: exact at every budget the hull steps land on, within one step of the optimum between)."""
    if not options:
        raise ValueError("nothing to allocate")
    hulls = {name: _hull(choices) for name, choices in options.items()}
    chosen = {name: 0 for name in hulls}
    spent = sum(hull[0].bytes for hull in hulls.values())
    if spent > budget:
        raise SrcrError(f"the budget is {budget:,} bytes of tensors but the smallest allocation takes {spent:,}")
    steps = [(_slope(hull[0], hull[1]), name) for name, hull in hulls.items() if len(hull) > 1]
    heapq.heapify(steps)
    while steps:
        _, name = heapq.heappop(steps)
        hull, index = hulls[name], chosen[name]
        extra = hull[index + 1].bytes - hull[index].bytes
        if spent + extra > budget:
            continue  # this tensor's next step does not fit; a smaller one elsewhere may
        spent += extra
        chosen[name] = index + 1
        if index + 2 < len(hull):
            heapq.heappush(steps, (_slope(hull[index + 1], hull[index + 2]), name))
    allocation = {name: hulls[name][index] for name, index in chosen.items()}
    return _spend_rest(allocation, options, budget - spent)


def _spend_rest(allocation: dict[str, Option], options: Mapping[str, Sequence[Option]], left: int) -> dict[str, Option]:
    """Off-hull upgrades that fit in the bytes the hull walk left, best loss saved first."""
    while True:
        best: tuple[float, str, Option] | None = None
        for name, choices in options.items():
            current = allocation[name]
            for option in choices:
                extra = option.bytes - current.bytes
                saved = current.cost - option.cost
                if 0 <= extra <= left and saved > 0 and (best is None or saved > best[0]):
                    best = (saved, name, option)
        if best is None:
            return allocation
        _, name, option = best
        left -= option.bytes - allocation[name].bytes
        allocation[name] = option
