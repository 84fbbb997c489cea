"""Distribution fidelity on held-out text: perplexity, KL divergence to the base model, top-1 agreement.

The text is cut into fixed, non-overlapping token windows. As in llama.cpp's `llama-perplexity`,
only the second half of each window is scored, so every scored token sees at least half a window
of context. The base model's next-token distribution at each scored position is kept as its top-k
tokens plus one bucket holding the remaining mass; the KL divergence KL(base || compressed) is
computed over those k + 1 outcomes (a lower bound on the full-vocabulary KL, see docs/metrics.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.evaluators import pack_checks as check


def token_windows(tokens: Sequence[int], n_windows: int, window_len: int, bos_id: int | None = None) -> np.ndarray:
    """int32 [n_windows, window_len]: consecutive text tokens, each window opened with BOS when given."""
    body = window_len - (bos_id is not None)
    if n_windows * body > len(tokens):
        fits = len(tokens) // body
        raise SrcrError(
            f"the evaluation text has {len(tokens)} tokens, enough for {fits} windows of {window_len}; "
            f"pass a longer text or fewer windows (at most {fits})"
        )
    windows = np.asarray(tokens[: n_windows * body], dtype=np.int32).reshape(n_windows, body)
    if bos_id is not None:
        windows = np.concatenate([np.full((n_windows, 1), bos_id, dtype=np.int32), windows], axis=1)
    return windows


def first_scored_row(window_len: int) -> int:
    """Only the second half of a window is scored: every scored token sees half a window of context."""
    return window_len // 2


def scored_rows(runtime: Runtime, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Log-probabilities of the second half of a window's rows, and the tokens they predict.

    Row i predicts token i + 1, so the last row (which predicts past the window) is not asked for.
    """
    first = first_scored_row(len(window))
    logprobs = runtime.logprobs(window[:-1].tolist(), first_row=first)
    return logprobs, window[first + 1 :].astype(np.int64)


def _logmass_outside(logprobs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1)


def _cross_terms(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q), with the convention 0 * log(0 / q) = 0."""
    terms = p_log.exp() * (p_log - q_log)
    return torch.where(torch.isneginf(p_log), torch.zeros_like(terms), terms)


@dataclass
class TopK:
    """A next-token distribution reduced to its k most likely tokens and the mass of all others."""

    ids: np.ndarray  # int32 [N, k], most likely first
    logprobs: np.ndarray  # float32 [N, k]
    tail_logmass: np.ndarray  # float32 [N]: log of the probability of every token outside `ids`

    @classmethod
    def of(cls, logprobs: np.ndarray, k: int) -> TopK:
        full = torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32))
        values, ids = torch.topk(full, k, dim=-1)
        return cls(
            ids=ids.to(torch.int32).numpy(),
            logprobs=values.numpy(),
            tail_logmass=_logmass_outside(full, ids).numpy(),
        )

    def kl_to(self, logprobs: np.ndarray) -> np.ndarray:
        """float64 [N]: KL(this || other) over the k tokens plus the tail bucket; other is full [N, V]."""
        other = torch.from_numpy(np.ascontiguousarray(logprobs, dtype=np.float32))
        ids = torch.from_numpy(self.ids.astype(np.int64))
        q_top = other.gather(-1, ids).double()
        q_tail = _logmass_outside(other, ids).double()
        p_top = torch.from_numpy(self.logprobs).double()
        p_tail = torch.from_numpy(self.tail_logmass).double()
        kl = _cross_terms(p_top, q_top).sum(-1) + _cross_terms(p_tail, q_tail)
        # Both bucketed distributions sum to 1 only up to float rounding; KL cannot be negative.
        return kl.clamp_min(0.0).numpy()


@dataclass
class DistributionReference:
    """The base model on the evaluation windows: what scoring another runtime needs, nothing more."""

    windows: np.ndarray  # int32 [W, L]
    top_k: TopK  # one row per scored position, window after window
    token_logprobs: np.ndarray  # float32 [N]: base log-probability of the token that actually follows

    @property
    def base_perplexity(self) -> float:
        return float(np.exp(-self.token_logprobs.astype(np.float64).mean()))

    @classmethod
    def build(
        cls, base: Runtime, windows: np.ndarray, k: int, progress: ProgressFn = no_progress
    ) -> DistributionReference:
        parts, token_logprobs = [], []
        for index, window in enumerate(windows):
            progress("reference: perplexity windows", index, len(windows))
            rows, targets = scored_rows(base, window)
            if k > rows.shape[-1]:
                raise SrcrError(f"top-k {k} exceeds the vocabulary ({rows.shape[-1]}); pass a smaller top-k")
            parts.append(TopK.of(rows, k))
            token_logprobs.append(rows[np.arange(len(targets)), targets])
        progress("reference: perplexity windows", len(windows), len(windows))
        top_k = TopK(
            ids=np.concatenate([part.ids for part in parts]),
            logprobs=np.concatenate([part.logprobs for part in parts]),
            tail_logmass=np.concatenate([part.tail_logmass for part in parts]),
        )
        return cls(windows=windows, top_k=top_k, token_logprobs=np.concatenate(token_logprobs))

    def score(self, runtime: Runtime, progress: ProgressFn = no_progress) -> tuple[dict, dict]:
        """(figures, timing) for `runtime` against the base model on the same windows."""
        # A pack only knows ids are below 2^31: a window's last token (only ever a target) and the
        # top-k ids index this runtime's logits without passing its token check.
        check.within_vocabulary("windows", self.windows, runtime.vocab_size)
        check.within_vocabulary("top_k_ids", self.top_k.ids, runtime.vocab_size)
        per_window = self.windows.shape[1] - 1 - first_scored_row(self.windows.shape[1])
        kl, agree, token_logprobs = [], [], []
        seconds = 0.0
        for index, window in enumerate(self.windows):
            progress("perplexity windows", index, len(self.windows))
            start = time.perf_counter()
            rows, targets = scored_rows(runtime, window)
            seconds += time.perf_counter() - start
            base = self._window_top_k(index, per_window)
            kl.append(base.kl_to(rows))
            agree.append(rows.argmax(-1) == base.ids[:, 0])
            token_logprobs.append(rows[np.arange(len(targets)), targets].astype(np.float64))
        progress("perplexity windows", len(self.windows), len(self.windows))
        kl_all = np.concatenate(kl)
        base_nll = -self.token_logprobs.astype(np.float64).reshape(len(self.windows), per_window).sum(-1)
        figures = {
            "perplexity": {
                "base": self.base_perplexity,
                "compressed": float(np.exp(-np.concatenate(token_logprobs).mean())),
            },
            "kld": {
                "mean": float(kl_all.mean()),
                "median": float(np.percentile(kl_all, 50)),
                "p90": float(np.percentile(kl_all, 90)),
                "p99": float(np.percentile(kl_all, 99)),
                "max": float(kl_all.max()),
            },
            "top1_agreement": float(np.concatenate(agree).mean()),
            # per window, for intervals (evaluators.uncertainty); evaluate() moves them out
            "items": {
                "window_kl": [float(values.mean()) for values in kl],
                "window_agreement": [float(values.mean()) for values in agree],
                "window_nll": [float(-values.sum()) for values in token_logprobs],
                "base_window_nll": base_nll.tolist(),
                "tokens_per_window": per_window,
            },
        }
        timing = {"tokens": int(self.windows.shape[0] * (self.windows.shape[1] - 1)), "seconds": seconds}
        return figures, timing

    def _window_top_k(self, index: int, per_window: int) -> TopK:
        rows = slice(index * per_window, (index + 1) * per_window)
        return TopK(self.top_k.ids[rows], self.top_k.logprobs[rows], self.top_k.tail_logmass[rows])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "windows": self.windows,
            "top_k_ids": self.top_k.ids,
            "top_k_logprobs": self.top_k.logprobs,
            "tail_logmass": self.top_k.tail_logmass,
            "token_logprobs": self.token_logprobs,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> DistributionReference:
        """The section as read from a pack, with every shape checked against the windows."""
        windows = check.token_ids(arrays, "windows", 2)
        count, length = windows.shape
        if count < 1 or length < 4:
            raise check.fail("windows", f"has shape {windows.shape}; a pack needs at least one window of 4 tokens")
        rows = count * (length - 1 - first_scored_row(length))
        ids = check.token_ids(arrays, "top_k_ids", 2)
        if ids.shape[0] != rows or ids.shape[1] < 1:
            raise check.fail("top_k_ids", f"has shape {ids.shape}, expected ({rows}, k)")
        logprobs = check.array(arrays, "top_k_logprobs", "f", 2)
        check.shape("top_k_logprobs", logprobs, ids.shape)
        tail = check.array(arrays, "tail_logmass", "f", 1)
        check.shape("tail_logmass", tail, (rows,))
        token_logprobs = check.array(arrays, "token_logprobs", "f", 1)
        check.shape("token_logprobs", token_logprobs, (rows,))
        if np.any(logprobs > 1e-3) or np.any(tail > 1e-3) or np.any(token_logprobs > 1e-3):
            raise check.fail("top_k_logprobs", "holds positive log-probabilities")
        if not np.all(np.isfinite(token_logprobs)):
            raise check.fail("token_logprobs", "holds -inf: the base model cannot have given the text zero probability")
        return cls(
            windows=windows.astype(np.int32),
            top_k=TopK(ids.astype(np.int32), logprobs.astype(np.float32), tail.astype(np.float32)),
            token_logprobs=token_logprobs.astype(np.float32),
        )
