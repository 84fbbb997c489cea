"""Lists of token-id lists stored as two flat arrays, so a reference pack needs no pickle."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pack_ragged(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets): row i is values[offsets[i] : offsets[i + 1]]."""
    lengths = np.array([len(row) for row in rows], dtype=np.int64)
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.fromiter((token for row in rows for token in row), dtype=np.int32, count=int(offsets[-1]))
    return values, offsets


def unpack_ragged(values: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    return [values[start:end].tolist() for start, end in zip(offsets[:-1], offsets[1:], strict=True)]


def checked_ragged(
    arrays: dict[str, np.ndarray], values_key: str, offsets_key: str, rows: int | None
) -> list[list[int]]:
    """unpack_ragged of arrays read from an untrusted pack: ids non-negative, offsets consistent."""
    from srcr.evaluators import pack_checks as check

    values = check.token_ids(arrays, values_key, 1)
    offsets = check.offsets(arrays, offsets_key, int(values.shape[0]))
    if rows is not None and offsets.shape[0] != rows + 1:
        raise check.fail(offsets_key, f"describe {offsets.shape[0] - 1} rows, expected {rows}")
    return unpack_ragged(values, offsets)
