"""The runtime interface: what evaluators may ask of a deployed artifact, and the loops every runtime shares.

A runtime (llama.cpp over a GGUF, ONNX Runtime over an .onnx, PyTorch over the dense model) only
implements one decoding step, `forward`: tokens in, raw logits out, the KV cache kept between
calls. Log-probabilities, greedy generation, and the checks on the token ids an untrusted reference
pack feeds in live here once, so every runtime is measured by the same code.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.logits import log_softmax

# What --device may say to a runtime. "gpu" and "cuda" both mean: the accelerator, or fail.
DEVICES = ("auto", "cpu", "gpu", "cuda")


def use_accelerator(device: str, available: bool, install_hint: str) -> bool:
    """Whether a runtime should run on its accelerator for a --device choice.

    `available` is what the runtime itself reports; `install_hint` names the fix when the user
    asked for an accelerator the runtime does not have.
    """
    if device not in DEVICES:
        raise SrcrError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device in ("gpu", "cuda") and not available:
        raise SrcrError(f"no GPU backend in this runtime; {install_hint} or use --device cpu")
    return available and device != "cpu"


def available_threads() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@runtime_checkable
class Runtime(Protocol):
    """What evaluators may ask of a deployed artifact. Token ids are the model's own vocabulary."""

    @property
    def vocab_size(self) -> int: ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids for `text`, without BOS or other special tokens."""
        ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def logprobs(self, tokens: Sequence[int], first_row: int = 0) -> np.ndarray:
        """float32 [len(tokens) - first_row, vocab]: row i is log p(next token | tokens[: first_row + i + 1]).

        Asking only for the rows that will be scored saves the runtime the rest of the softmax
        (and llama.cpp the rest of the output projection).
        """
        ...

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy continuation of `tokens` (new tokens only), stopping early at end-of-generation."""
        ...

    def info(self) -> dict[str, Any]:
        """Runtime name, version and the execution provider/backend that actually ran."""
        ...

    def close(self) -> None: ...


class DecoderRuntime(ABC):
    """A runtime built from one step. Subclasses implement `forward` and `is_end_of_generation`."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @property
    def context_length(self) -> int | None:
        """The most tokens one sequence may hold, or None when only memory limits it."""
        return None

    @abstractmethod
    def forward(self, tokens: Sequence[int], reset: bool, first_row: int) -> np.ndarray:
        """Raw logits [len(tokens) - first_row, vocab] of `tokens` appended to the cached sequence.

        With `reset` the cache is emptied first. Rows before `first_row` need not be computed.
        """

    @abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    def check_tokens(self, tokens: Sequence[int]) -> None:
        """Refuse ids a runtime must never see: they come from files srcr reads back (reference packs)."""
        if len(tokens) == 0:
            raise SrcrError("a runtime was given no tokens; the reference pack is damaged, rebuild it")
        ids = np.asarray(tokens)
        if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.vocab_size:
            raise SrcrError(
                f"token ids outside this model's vocabulary of {self.vocab_size} (min {ids.min()}, max {ids.max()}); "
                "the reference pack was made for another model or is damaged: rebuild it with srcr export"
            )
        limit = self.context_length
        if limit is not None and len(tokens) > limit:
            raise SrcrError(f"{len(tokens)} tokens exceed the runtime's context of {limit}; use shorter windows")

    def logprobs(self, tokens: Sequence[int], first_row: int = 0) -> np.ndarray:
        self.check_tokens(tokens)
        if not 0 <= first_row < len(tokens):
            raise ValueError(f"first_row {first_row} is outside the {len(tokens)} tokens")
        return log_softmax(self.forward(tokens, reset=True, first_row=first_row))

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding: the arg-max token each step, no sampling and no repetition penalty.

        The end-of-generation token ends the reply and is not part of it.
        """
        self.check_tokens(tokens)
        budget = max_new_tokens
        if self.context_length is not None:
            budget = min(budget, self.context_length - len(tokens))
        new_tokens: list[int] = []
        if budget <= 0:
            return new_tokens
        logits = self.forward(tokens, reset=True, first_row=len(tokens) - 1)
        while len(new_tokens) < budget:
            token = int(np.argmax(logits[-1]))
            if self.is_end_of_generation(token):
                break
            new_tokens.append(token)
            if len(new_tokens) < budget:
                logits = self.forward([token], reset=False, first_row=0)
        return new_tokens
