"""The GGUF artifact run by llama.cpp (llama-cpp-python), behind the evaluators' `Runtime` interface."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from exporter.errors import SrcrError
from targets.logits import log_softmax

DEFAULT_N_CTX = 2048
_SEED = 0
DEVICES = ("auto", "cpu", "gpu", "cuda")


def available_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def gpu_layers_for(device: str) -> int:
    """llama.cpp's n_gpu_layers for a --device choice: all layers on the GPU when there is one."""
    if device not in DEVICES:
        raise SrcrError(f"unknown device {device!r} for the GGUF runtime; use one of {', '.join(DEVICES)}")
    has_gpu = bool(llama_cpp.llama_supports_gpu_offload())
    if device in ("gpu", "cuda") and not has_gpu:
        raise SrcrError(
            "this llama-cpp-python build has no GPU backend; reinstall it with "
            'CMAKE_ARGS="-DGGML_CUDA=on" or use --device cpu'
        )
    return -1 if has_gpu and device != "cpu" else 0


def _gpu_backend_name() -> str:
    """The first non-CPU backend in llama.cpp's system info ("CUDA : ARCHS = ... | CPU : ...")."""
    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    for section in info.split("|"):
        if ":" in section and (name := section.split(":", 1)[0].strip()) != "CPU":
            return name.lower()
    return "gpu"


class LlamaCppRuntime:
    """One GGUF model in llama.cpp with logits for every position (needed for log-probabilities)."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        self.path = Path(path)
        self.n_threads = n_threads or available_threads()
        self.n_gpu_layers = n_gpu_layers
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_threads=self.n_threads,
                n_threads_batch=self.n_threads,
                n_gpu_layers=n_gpu_layers,
                logits_all=True,
                seed=_SEED,
                verbose=False,
            )
        except ValueError as error:
            raise SrcrError(f"llama.cpp could not load {self.path}: {error}; re-export the artifact") from error
        # llama.cpp may round its context up; llama-cpp-python's buffers keep the size asked for.
        self.n_ctx = min(n_ctx, self._llm.n_ctx())
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)

    def tokenize(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._llm.detokenize(list(tokens)).decode("utf-8", errors="replace")

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Raw float32 logits [len(tokens), vocab] of one evaluation of the window from an empty cache."""
        return self._scores(tokens).copy()

    def _scores(self, tokens: Sequence[int]) -> np.ndarray:
        # A view of llama-cpp-python's buffer: valid until the next evaluation.
        self._check_fits(len(tokens))
        self._llm.reset()
        self._llm.eval(list(tokens))
        # `scores` has n_ctx rows; only the first len(tokens) were written by this evaluation.
        return self._llm.scores[: len(tokens)]

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        return log_softmax(self._scores(tokens))

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding: the arg-max token each step, no sampling and no repetition penalty."""
        self._check_fits(len(tokens))
        budget = min(max_new_tokens, self.n_ctx - len(tokens))
        self._llm.reset()
        self._llm.eval(list(tokens))
        new_tokens: list[int] = []
        while len(new_tokens) < budget:
            token = int(np.argmax(self._llm.scores[self._llm.n_tokens - 1]))
            if llama_cpp.llama_vocab_is_eog(self._vocab, token):
                break
            new_tokens.append(token)
            if len(new_tokens) < budget:
                self._llm.eval([token])
        return new_tokens

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "backend": _gpu_backend_name() if self.n_gpu_layers != 0 else "cpu",
            "n_threads": self.n_threads,
            "n_ctx": self.n_ctx,
        }

    def close(self) -> None:
        llm, self._llm = getattr(self, "_llm", None), None
        if llm is not None:
            llm.close()

    def _check_fits(self, n_tokens: int) -> None:
        if n_tokens == 0:
            raise ValueError("need at least one token")
        if n_tokens > self.n_ctx:
            raise SrcrError(f"{n_tokens} tokens exceed the GGUF runtime's context of {self.n_ctx}; use shorter windows")
