"""llama.cpp's log, captured instead of printed, so its reason for a failure can go into one SrcrError line."""

from __future__ import annotations

import contextlib
import ctypes
import re
from collections.abc import Iterator

import llama_cpp


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines for the block; llama-cpp-python's own logger is restored after."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def failure_reason(lines: list[str], marker: str) -> str:
    """The text after `marker` in the log ("failed to quantize: ..."), else its last line."""
    text = "".join(lines)
    match = re.search(re.escape(marker) + r"\s*(.+)", text)
    if match:
        return match.group(1).strip()
    return (text.strip().splitlines() or ["no reason logged"])[-1].strip()


def check_vocab_loads(path: str) -> str | None:
    """Load only the vocabulary of a GGUF with llama.cpp; None if it loads, else llama.cpp's reason."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    with captured_llama_log() as lines:
        model = llama_cpp.llama_model_load_from_file(path.encode("utf-8"), params)
    if model is None:
        return failure_reason(lines, "error loading model:")
    llama_cpp.llama_model_free(model)
    return None
