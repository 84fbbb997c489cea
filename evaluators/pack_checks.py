"""Checks on arrays read back from a reference pack: a pack is untrusted input.

Each check raises SrcrError naming the array and what is wrong with it, so a damaged or crafted
pack ends in one line instead of a numpy traceback (or a runtime fed nonsense).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from srcr.base.errors import SrcrError


class PackError(SrcrError):
    """A reference pack that is not what srcr wrote."""


def fail(name: str, problem: str) -> PackError:
    return PackError(f"reference pack array {name!r} {problem}; rebuild the pack with srcr export")


def array(arrays: Mapping[str, np.ndarray], name: str, kinds: str, ndim: int) -> np.ndarray:
    """`arrays[name]`, which must exist, have a dtype kind in `kinds` (numpy's codes) and `ndim` axes."""
    if name not in arrays:
        raise fail(name, "is missing")
    value = arrays[name]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in kinds:
        raise fail(name, f"has dtype {getattr(value, 'dtype', type(value).__name__)}, expected kind {kinds!r}")
    if value.ndim != ndim:
        raise fail(name, f"has {value.ndim} axes, expected {ndim}")
    if value.dtype.kind == "f" and not np.all(np.isfinite(value) | np.isneginf(value)):
        raise fail(name, "holds NaN or +inf")
    return value


def token_ids(arrays: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    value = array(arrays, name, "iu", ndim)
    if value.size and (value.min() < 0 or value.max() >= 1 << 31):
        raise fail(name, "holds token ids outside [0, 2^31)")
    return value.astype(np.int64, copy=False)


def offsets(arrays: Mapping[str, np.ndarray], name: str, total: int) -> np.ndarray:
    """Ragged-array offsets: start at 0, never decrease, end at `total`."""
    value = array(arrays, name, "iu", 1)
    if value.size == 0 or value[0] != 0 or value[-1] != total or np.any(np.diff(value.astype(np.int64)) < 0):
        raise fail(name, f"are not offsets into {total} values")
    return value.astype(np.int64, copy=False)


def within_vocabulary(name: str, ids: np.ndarray, vocab_size: int) -> None:
    """Token ids a scorer indexes logits with (targets, top-k ids) never reach the runtime's own check."""
    if ids.size and int(ids.max()) >= vocab_size:
        raise fail(
            name,
            f"holds token id {int(ids.max())}, outside this model's vocabulary of {vocab_size} "
            "(a pack made for another model?)",
        )


def shape(name: str, value: np.ndarray, expected: tuple[int, ...]) -> None:
    if value.shape != expected:
        raise fail(name, f"has shape {value.shape}, expected {expected}")


def scalar_int(arrays: Mapping[str, np.ndarray], name: str, low: int, high: int) -> int:
    value = array(arrays, name, "iu", 0)
    number = int(value)
    if not low <= number <= high:
        raise fail(name, f"is {number}, outside [{low}, {high}]")
    return number


def strings(arrays: Mapping[str, np.ndarray], name: str, count: int | None = None) -> list[str]:
    value = array(arrays, name, "U", 1)
    if count is not None and value.shape != (count,):
        raise fail(name, f"holds {value.shape[0]} strings, expected {count}")
    return value.tolist()
