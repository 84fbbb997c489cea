"""Choosing among compressed configurations: Pareto fronts, constrained picks, equal-TCr comparisons.

Pure functions over plain records ({"name", "sr", "tcr", "bytes", "sparsity", "pack", ...}) so they
are tested on constructed points and reused by the table and the HTML report. Where two records'
per-item scores are given (`items`, by name) and they were scored on the same items (one reference
pack), a difference between them comes with its paired 95% interval and is called a tie when the
interval holds zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from srcr.base.errors import SrcrError
from srcr.evaluators.uncertainty import ItemScores, paired_difference

Record = dict[str, Any]
Items = Mapping[str, ItemScores]


def difference(first: Record, second: Record, items: Items | None, objective: str = "sr") -> Record | None:
    """`objective` (sr or srcr) of `first` minus `second`, with its paired interval and whether it is
    significant; None when the two were not scored on the same items."""
    if not items or first["name"] not in items or second["name"] not in items:
        return None
    if first.get("pack") is None or first.get("pack") != second.get("pack"):
        return None
    scales = (first["tcr"], second["tcr"]) if objective == "srcr" else (1.0, 1.0)
    return paired_difference(items[first["name"]], items[second["name"]], "sr", scales).as_dict()


def is_joint(record: Record) -> bool:
    """Pruned (zeroed or structurally removed) and quantized, as opposed to quantization alone."""
    return bool(record["sparsity"] > 0 or record.get("pattern") or record.get("removed", 0) > 0)


def pareto_front(records: list[Record], compression_key: str, higher_is_better: bool = True) -> set[str]:
    """Names of the records that no other record dominates in (Sr, compression).

    B dominates A when B is at least as good on both axes and strictly better on one. Compression
    is "higher is better" for TCr and "lower is better" for bytes on disk.
    """
    sign = 1.0 if higher_is_better else -1.0
    points = [(r["name"], r["sr"], sign * r[compression_key]) for r in records if r.get("sr") is not None]
    front = set()
    for name, sr, comp in points:
        dominated = any(
            other_sr >= sr and other_comp >= comp and (other_sr > sr or other_comp > comp)
            for other_name, other_sr, other_comp in points
            if other_name != name
        )
        if not dominated:
            front.add(name)
    return front


def recommend(records: list[Record], budget_mb: float | None = None, min_retention: float | None = None) -> Record:
    """The configuration for the user's constraint; max SrCr when there is none."""
    scored = [r for r in records if r.get("sr") is not None]
    if not scored:
        raise SrcrError("no evaluated configuration to choose from; run the sweep with evaluation enabled")
    if budget_mb is not None and min_retention is not None:
        raise SrcrError("pass either --budget-mb or --min-retention, not both")
    if budget_mb is not None:
        fitting = [r for r in scored if r["bytes"] <= budget_mb * 1e6]
        if not fitting:
            smallest = min(r["bytes"] for r in scored) / 1e6
            raise SrcrError(f"no configuration fits {budget_mb} MB (smallest is {smallest:.1f} MB); raise --budget-mb")
        return max(fitting, key=lambda r: (r["sr"], -r["bytes"]))
    if min_retention is not None:
        keeping = [r for r in scored if r["sr"] >= min_retention]
        if not keeping:
            best = max(r["sr"] for r in scored)
            raise SrcrError(f"no configuration keeps Sr ≥ {min_retention} (best is {best:.4f}); lower --min-retention")
        return max(keeping, key=lambda r: (r["tcr"], -r["bytes"], r["sr"]))
    return max(scored, key=lambda r: (r["srcr"], r["sr"]))


def equal_tcr_comparison(records: list[Record], digits: int = 6, items: Items | None = None) -> list[Record]:
    """For each TCr reached both by quantization alone and by pruning + quantization, the best Sr of each."""
    levels: dict[float, dict[str, list[Record]]] = defaultdict(lambda: {"quant_only": [], "joint": []})
    for record in records:
        if record.get("sr") is None:
            continue
        kind = "joint" if is_joint(record) else "quant_only"
        levels[round(record["tcr"], digits)][kind].append(record)
    rows = []
    for level in sorted(levels):
        groups = levels[level]
        if not groups["quant_only"] or not groups["joint"]:
            continue
        quant = max(groups["quant_only"], key=lambda r: r["sr"])
        joint = max(groups["joint"], key=lambda r: r["sr"])
        rows.append(
            {
                "tcr": level,
                "quant_only": quant["name"],
                "quant_only_sr": quant["sr"],
                "joint": joint["name"],
                "joint_sr": joint["sr"],
                "relative_difference": (joint["sr"] - quant["sr"]) / quant["sr"] if quant["sr"] else None,
                # joint minus quantization-only Sr, paired over the items: a tie when its interval holds 0
                "difference": difference(joint, quant, items),
            }
        )
    return rows


def break_tie(
    chosen: Record, records: list[Record], items: Items | None, objective: str
) -> tuple[Record, Record | None]:
    """(the pick, the rival it could not be told from): when the runner-up by `objective` is within the
    items' noise of the pick, the smaller file of the two is the pick; the rival carries the difference."""
    rivals = [r for r in records if r.get(objective) is not None and r["name"] != chosen["name"]]
    if not rivals:
        return chosen, None
    runner_up = max(rivals, key=lambda r: (r[objective], -r["bytes"]))
    found = difference(chosen, runner_up, items, objective)
    if found is None or found["significant"]:
        return chosen, None
    # Tied: the smaller file, or at equal size the higher Sr (the tie is stated as the pick minus the rival).
    if (runner_up["bytes"], -runner_up["sr"]) < (chosen["bytes"], -chosen["sr"]):
        found = {**found, "value": -found["value"], "low": -found["high"], "high": -found["low"]}
        chosen, runner_up = runner_up, chosen
    return chosen, {**runner_up, "tie": {**found, "objective": objective}}


def no_smaller_unpruned(record: Record, records: list[Record]) -> Record | None:
    """For a pruned pick, the best quantization-only configuration whose file is no larger, if any.

    Formats that store pruned zeros at full size (GGUF's block quants, ONNX's MatMulNBits) make
    a pruned file exactly as large as the unpruned one of the same type; SrCr, built on TCr,
    still credits the pruning.
    """
    if not is_joint(record):
        return None
    rivals = [r for r in records if r.get("sr") is not None and not is_joint(r) and r["bytes"] <= record["bytes"]]
    return max(rivals, key=lambda r: (r["sr"], -r["bytes"])) if rivals else None


def recommendation_sentence(
    record: Record,
    budget_mb: float | None,
    min_retention: float | None,
    records: list[Record] | None = None,
    tie: Record | None = None,
) -> str:
    if budget_mb is not None:
        goal = f"the highest Sr within {budget_mb:g} MB"
    elif min_retention is not None:
        goal = f"the most compression with Sr ≥ {min_retention:g}"
    else:
        goal = "the highest SrCr"
    sentence = (
        f"Recommended for {goal}: {record['name']} (Sr {record['sr']:.4f}, TCr {record['tcr']:.4f}, "
        f"SrCr {record['srcr']:.4f}, {record['bytes'] / 1e6:.1f} MB)"
    )
    if tie is not None:
        found = tie["tie"]
        name = "SrCr" if found["objective"] == "srcr" else "Sr"
        sentence += (
            f"; it cannot be told apart from {tie['name']} ({tie['bytes'] / 1e6:.1f} MB: {name} difference "
            f"{found['value']:+.4f}, 95% interval {found['low']:+.4f} to {found['high']:+.4f}), so "
            + (
                "the smaller file is recommended"
                if tie["bytes"] != record["bytes"]
                else "of two equal files the one with the higher Sr is recommended"
            )
        )
    rival = no_smaller_unpruned(record, records or [])
    if rival is not None:
        sentence += (
            f", though the unpruned {rival['name']} is no larger on disk ({rival['bytes'] / 1e6:.1f} MB, "
            f"Sr {rival['sr']:.4f})"
        )
    return sentence + "."
