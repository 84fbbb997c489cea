"""An exported .onnx artifact run by ONNX Runtime, behind the evaluators' `Runtime` interface.

Everything comes from the one file: the graph, the tokenizer (read with the `tokenizers` library)
and the end-of-sequence ids, so no transformers install is needed where it runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from exporter.errors import SrcrError
from targets.logits import log_softmax
from targets.onnx.artifact import (
    FORMAT_KEY,
    MODEL_KEY,
    QUANTIZATION_KEY,
    TOKENIZER_KEY,
    ModelFacts,
    decode_tokenizer,
)
from targets.onnx.graph import input_names, past_names

DEVICES = ("auto", "cpu", "gpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
ORT_DEFAULT_LOG_SEVERITY = 2  # warnings and above, onnxruntime's own default


def require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise SrcrError(
            "onnxruntime is not installed; run `pip install onnxruntime-gpu` (or `onnxruntime` for CPU only)"
        ) from error
    return onnxruntime


def requested_providers(ort: Any, device: str) -> list[str]:
    if device not in DEVICES:
        raise SrcrError(f"unknown device {device!r} for the ONNX runtime; use one of {', '.join(DEVICES)}")
    if device == "cpu" or CUDA not in ort.get_available_providers():
        if device in ("gpu", "cuda"):
            raise SrcrError(
                "this onnxruntime has no CUDA execution provider; install onnxruntime-gpu or use --device cpu"
            )
        return [CPU]
    return [CUDA, CPU]


def _open_session(ort: Any, path: Path, providers: list[str]) -> Any:
    """An InferenceSession; a CUDA provider that cannot start falls back to CPU without log noise.

    onnxruntime-gpu lists CUDA even where its libraries are missing and then logs an error while
    falling back; whether CUDA really runs is read from get_providers() instead.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if CUDA not in providers:
        return ort.InferenceSession(str(path), options, providers=providers)
    ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    finally:
        ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)


class OrtRuntime:
    """One InferenceSession over the artifact; the KV cache is carried between calls as numpy arrays."""

    def __init__(self, artifact: Path, device: str = "auto") -> None:
        ort = require_onnxruntime()
        from tokenizers import Tokenizer

        self.path = Path(artifact)
        if not self.path.is_file():
            raise SrcrError(f"{self.path} does not exist; pass the .onnx file written by `srcr export --format onnx`")
        providers = requested_providers(ort, device)
        self._session = _open_session(ort, self.path, providers)
        if device in ("gpu", "cuda") and CUDA not in self._session.get_providers():
            raise SrcrError("the CUDA execution provider could not start (CUDA/cuDNN libraries?); use --device cpu")
        metadata = self._session.get_modelmeta().custom_metadata_map
        if TOKENIZER_KEY not in metadata or MODEL_KEY not in metadata:
            raise SrcrError(f"{self.path} was not written by srcr (no tokenizer metadata); export it with srcr")
        self._tokenizer = Tokenizer.from_str(decode_tokenizer(metadata[TOKENIZER_KEY]))
        self.facts = ModelFacts.from_json(metadata[MODEL_KEY])
        self.quantization = json.loads(metadata.get(QUANTIZATION_KEY, "{}"))
        self.format_info = json.loads(metadata.get(FORMAT_KEY, "{}"))
        self._eos = set(self.facts.eos_token_ids)
        self._ort_version = ort.__version__
        self._check_inputs()

    def _check_inputs(self) -> None:
        present = {graph_input.name for graph_input in self._session.get_inputs()}
        missing = [name for name in input_names(self.facts.layers) if name not in present]
        if missing:
            raise SrcrError(f"{self.path} lacks graph inputs {missing[:3]}; re-export it with this srcr version")

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode([int(token) for token in tokens], skip_special_tokens=True)

    def _empty_cache(self) -> list[np.ndarray]:
        shape = (1, self.facts.kv_heads, 0, self.facts.head_dim)
        return [np.zeros(shape, dtype=np.float32) for _ in range(2 * self.facts.layers)]

    def _step(self, tokens: Sequence[int], past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """logits [len(tokens), vocab] for `tokens` after the cached prefix, and the extended cache."""
        past_length = past[0].shape[2]
        step = len(tokens)
        feed = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, past_length + step), dtype=np.int64),
            "position_ids": np.arange(past_length, past_length + step, dtype=np.int64)[None],
        }
        feed.update(zip(past_names(self.facts.layers), past, strict=True))
        logits, *present = self._session.run(None, feed)
        return logits[0], present

    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        if len(tokens) == 0:
            raise ValueError("logprobs needs at least one token")
        logits, _ = self._step(tokens, self._empty_cache())
        return log_softmax(logits)

    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> list[int]:
        """Greedy decoding with the KV cache; the end-of-sequence token ends the reply and is not returned."""
        if len(tokens) == 0:
            raise ValueError("generate needs at least one prompt token")
        new_tokens: list[int] = []
        logits, cache = self._step(tokens, self._empty_cache())
        while len(new_tokens) < max_new_tokens:
            token = int(np.argmax(logits[-1]))
            if token in self._eos:
                break
            new_tokens.append(token)
            if len(new_tokens) < max_new_tokens:
                logits, cache = self._step([token], cache)
        return new_tokens

    def info(self) -> dict[str, Any]:
        providers = self._session.get_providers()
        return {
            "runtime": "onnxruntime",
            "version": self._ort_version,
            "providers": providers,
            "device": "cuda" if CUDA in providers else "cpu",
            "opset": self.format_info.get("opset"),
            "bos_token_id": self.facts.bos_token_id,
            "quantization": self.quantization.get("quant_type"),
        }

    def close(self) -> None:
        self._session = None
        self._tokenizer = None
