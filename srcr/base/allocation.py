"""Choosing one storage option per tensor so that the file fits a byte budget at the least predicted loss.

Pure arithmetic, shared by every target: a target lists each tensor's options (its bytes and predicted
cost, e.g. mean KL), and `allocate` solves the multiple-choice knapsack by the Lagrangian walk along
each tensor's lower convex hull (the cheapest loss per byte first), then spends what is left on the
best single upgrades that still fit. The predicted cost of a tensor's option is its KL curve (measured
on the calibration data by two probes, `KlCurve`) at the option's relative error.

Those costs are assumed to add, and where one tensor dominates they do not. With a `WholeModelCheck`
(--budget-check) the additive choice and a few alternatives (`alternatives`) are measured on the whole
model instead and the least kept (`pick_measured`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress


@dataclass(frozen=True)
class Option:
    label: str  # the format's name for it, e.g. "Q4_K"
    bytes: int
    cost: float  # predicted loss (mean KL) this tensor adds when stored this way


# A candidate allocation is not measured when one of its tensors alone is predicted to cost this many
# times the best whole-model KL measured so far (predictions are within about 2x, docs/results.md).
HOPELESS = 3.0
# Bounds on a KL curve's fitted exponent: a noisy coarse probe must not make the curve fall or explode.
EXPONENT_RANGE = (0.5, 3.0)


@dataclass(frozen=True)
class KlCurve:
    """A tensor's predicted mean KL as a function of its relative error, from two measured probes.

    Linear up to the mild probe's error (small perturbations: the KL is quadratic in them, as the error
    is), and beyond it a power law through the coarse probe: at 2 bits the KL grows faster than the
    error (measured on a trained Llama: exponents 1.1-1.6, docs/results.md)."""

    error: float  # the mild probe's relative error
    kl: float  # the mean KL it measured
    exponent: float = 1.0  # the power law's, through the coarse probe

    @classmethod
    def through(cls, mild: tuple[float, float], coarse: tuple[float, float] | None = None) -> KlCurve:
        """The curve through (error, KL) of the mild probe and, when given and above it, the coarse one."""
        error, kl = mild
        exponent = 1.0
        if coarse is not None and error > 0 and kl > 0 and coarse[0] > error and coarse[1] > 0:
            low, high = EXPONENT_RANGE
            exponent = min(high, max(low, math.log(coarse[1] / kl) / math.log(coarse[0] / error)))
        return cls(error=error, kl=kl, exponent=exponent)

    def __call__(self, error: float) -> float:
        if self.error <= 0 or self.kl <= 0:
            return 0.0
        ratio = error / self.error
        return self.kl * (ratio if ratio <= 1 else ratio**self.exponent)


# The model's mean KL on the calibration tokens with these weight matrices (the target's tensor name ->
# the [out, in] values it would store) in place of its own.
WholeModelKl = Callable[[Mapping[str, np.ndarray]], float]
# (tensor name, option label) -> the [out, in] values that option stores for that tensor; None: the
# tensor cannot be placed in the model (a fused one) and keeps its own values there.
Approximate = Callable[[str, str], "np.ndarray | None"]


@dataclass(frozen=True)
class WholeModelCheck:
    """How to measure a candidate allocation on the whole model: each tensor's stored values, and the
    model's KL with all of them in place (tensors whose losses interact are measured together)."""

    approximate: Approximate
    measure: WholeModelKl


@dataclass(frozen=True)
class Checked:
    candidate: str  # how it was built: "additive", "uniform Q4_K", "<tensor> at <label>"
    predicted_kl: float
    measured_kl: float


@dataclass(frozen=True)
class Allocation:
    """The storage chosen for every weight matrix of one artifact, and what it was chosen against."""

    types: dict[str, str]  # the format's tensor name -> its option's label (a ggml type, a MatMulNBits config)
    budget_bytes: int  # the whole file's budget
    tensor_budget: int  # what was left for the weight matrices after the header, vocabulary and other tensors
    predicted_kl: float  # summed predicted mean KL (the model's, on the calibration tokens)
    unmeasured: list[str] = field(default_factory=list)  # pinned to a safe option: no sensitivity was measured
    # The candidates measured on the whole model, the chosen one first; empty when none were.
    checked: list[Checked] = field(default_factory=list)

    def manifest_section(self) -> dict[str, object]:
        return {
            "budget_bytes": self.budget_bytes,
            "tensor_budget_bytes": self.tensor_budget,
            "predicted_kl": self.predicted_kl,
            "measured_kl": self.checked[0].measured_kl if self.checked else None,
            "chosen": self.checked[0].candidate if self.checked else "additive",
            "checked": [vars(checked) for checked in self.checked],
            "tensors": dict(self.types),
            "unmeasured": list(self.unmeasured),
        }


def allocate_file(
    options: Mapping[str, Sequence[Option]],
    pinned: Mapping[str, Option],
    budget_bytes: int,
    tensor_budget: int,
    format_name: str,
    check: WholeModelCheck | None = None,
    progress: ProgressFn = no_progress,
) -> Allocation:
    """The least-loss choice for the tensors with `options` in what `tensor_budget` leaves after the `pinned`
    ones; a SrcrError naming the smallest whole-file budget when even the smallest choices do not fit.

    With `check`, the additive choice and its alternatives (`alternatives`) are measured on the whole
    model and the one of least measured KL is kept: the tensors' losses do not add (docs/results.md)."""
    left = tensor_budget - sum(option.bytes for option in pinned.values())
    smallest = sum(min(option.bytes for option in choices) for choices in options.values())
    if not options or left < smallest:
        floor = budget_bytes - left + smallest
        raise SrcrError(
            f"no {format_name} of this model fits {budget_bytes / 1e6:.2f} MB: the smallest allocation takes "
            f"{floor / 1e6:.2f} MB; raise --budget-mb (or --budget-bpw)"
        )
    chosen = allocate(options, left)
    checked: list[Checked] = []
    if check is not None:
        chosen, checked = pick_measured(alternatives(options, left, chosen), pinned, check, progress)
    return Allocation(
        types={**{name: option.label for name, option in chosen.items()}, **{n: o.label for n, o in pinned.items()}},
        budget_bytes=budget_bytes,
        tensor_budget=tensor_budget,
        predicted_kl=_cost(chosen),
        unmeasured=sorted(pinned),
        checked=checked,
    )


def _cost(choice: Mapping[str, Option]) -> float:
    return sum(option.cost for option in choice.values())


def alternatives(
    options: Mapping[str, Sequence[Option]], left: int, additive: dict[str, Option], uniform: int = 1
) -> list[tuple[str, dict[str, Option]]]:
    """The additive choice and the ones worth measuring beside it, in `left` bytes.

    The largest tensor (a large vocabulary's embedding or head) is where additivity fails most: damage
    there hides some of the rest's, so the additive choice may starve it. So: that tensor pinned at each
    of its options that no other beats in both bytes and loss and that fit, the others allocated in what
    is left; and the `uniform` options of
    least predicted loss that every tensor has and that fit (what a fixed-type file would hold)."""
    found = [("additive", additive)]
    if len(options) > 1:
        largest = max(options, key=lambda name: min(option.bytes for option in options[name]))
        others = {name: choices for name, choices in options.items() if name != largest}
        others_floor = sum(min(option.bytes for option in choices) for choices in others.values())
        for option in frontier(options[largest]):
            if option.label != additive[largest].label and option.bytes + others_floor <= left:
                rest = allocate(others, left - option.bytes)
                found.append((f"{largest} at {option.label}", {largest: option, **rest}))
    shared = set.intersection(*({option.label for option in choices} for choices in options.values()))
    fitting = []
    for label in shared:
        choice = {name: next(o for o in choices if o.label == label) for name, choices in options.items()}
        if sum(option.bytes for option in choice.values()) <= left:
            fitting.append((_cost(choice), label, choice))
    for _, label, choice in sorted(fitting, key=lambda item: (item[0], item[1]))[:uniform]:
        found.append((f"uniform {label}", choice))
    return found


def pick_measured(
    candidates: Sequence[tuple[str, dict[str, Option]]],
    pinned: Mapping[str, Option],
    check: WholeModelCheck,
    progress: ProgressFn = no_progress,
) -> tuple[dict[str, Option], list[Checked]]:
    """The candidate of least measured whole-model KL, and the figures of those measured (the chosen first).

    A candidate one of whose tensors alone is predicted to cost more than `HOPELESS` times the best
    measured so far is not measured: damage elsewhere hides part of a tensor's loss, not all of it.
    Consecutive candidates share most of their options, so only the tensors whose option changed are
    approximated again; one set of stored values is held at a time."""
    held: dict[str, tuple[str, np.ndarray | None]] = {}
    results: list[tuple[float, int, Checked]] = []
    for index, (name, choice) in enumerate(candidates):
        progress(f"check allocations {index + 1}/{len(candidates)}", index, len(candidates))
        if results and max(option.cost for option in choice.values()) > HOPELESS * results[0][0]:
            continue
        for tensor, option in {**choice, **pinned}.items():
            if tensor not in held or held[tensor][0] != option.label:
                held[tensor] = (option.label, check.approximate(tensor, option.label))
        measured = check.measure({tensor: values for tensor, (_, values) in held.items() if values is not None})
        measured = measured if math.isfinite(measured) else math.inf  # a broken candidate is never kept
        results.append((measured, index, Checked(name, _cost(choice), measured)))
        results.sort(key=lambda item: (item[0], item[1]))  # ties: the earlier (the additive) candidate
    progress(f"check allocations {len(candidates)}/{len(candidates)}", len(candidates), len(candidates))
    return dict(candidates[results[0][1]][1]), [checked for _, _, checked in results]


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
    hull: list[Option] = []
    for option in frontier(options):  # an option with more bytes for no less loss is never on the hull
        while len(hull) >= 2 and _slope(hull[-2], hull[-1]) >= _slope(hull[-1], option):
            hull.pop()
        hull.append(option)
    return hull


def frontier(options: Sequence[Option]) -> list[Option]:
    """The options no other beats in both bytes and cost, from fewest bytes to most."""
    kept: list[Option] = []
    for option in sorted(options, key=lambda option: (option.bytes, option.cost)):
        if not kept or option.cost < kept[-1].cost:
            kept.append(option)
    return kept


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
