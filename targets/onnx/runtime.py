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

from srcr.base.errors import SrcrError
from srcr.base.runtime import DecoderRuntime, available_threads, use_accelerator
from srcr.targets.onnx.artifact import (
    FORMAT_KEY,
    MODEL_KEY,
    QUANTIZATION_KEY,
    TOKENIZER_KEY,
    ModelFacts,
    decode_tokenizer,
)
from srcr.targets.onnx.graph import input_names, past_names

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
    has_cuda = CUDA in ort.get_available_providers()
    if use_accelerator(device, has_cuda, "install onnxruntime-gpu"):
        return [CUDA, CPU]
    return [CPU]


def _open_session(ort: Any, path: Path, providers: list[str], threads: int) -> Any:
    """An InferenceSession; a CUDA provider that cannot start falls back to CPU without log noise.

    onnxruntime-gpu lists CUDA even where its libraries are missing and then logs an error while
    falling back; whether CUDA really runs is read from get_providers() instead. A file ORT cannot
    read (damaged, foreign, crafted) is a SrcrError, whatever ORT's exception class says.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    quiet = CUDA in providers
    if quiet:
        ort.set_default_logger_severity(4)
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as error:  # onnxruntime raises its own classes (InvalidProtobuf, Fail, ...)
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise SrcrError(f"ONNX Runtime cannot load {path.name} ({first_line[:200]}); re-export the artifact") from None
    finally:
        if quiet:
            ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)


class OrtRuntime(DecoderRuntime):
    """One InferenceSession over the artifact; the KV cache is carried between calls as numpy arrays."""

    def __init__(self, artifact: Path, device: str = "auto", threads: int | None = None) -> None:
        ort = require_onnxruntime()
        from tokenizers import Tokenizer

        self.path = Path(artifact)
        if not self.path.is_file():
            raise SrcrError(f"{self.path} does not exist; pass the .onnx file written by `srcr export --format onnx`")
        self.threads = threads or available_threads()
        self._session = _open_session(ort, self.path, requested_providers(ort, device), self.threads)
        if device in ("gpu", "cuda") and CUDA not in self._session.get_providers():
            raise SrcrError("the CUDA execution provider could not start (CUDA/cuDNN libraries?); use --device cpu")
        metadata = self._session.get_modelmeta().custom_metadata_map
        if TOKENIZER_KEY not in metadata or MODEL_KEY not in metadata:
            raise SrcrError(f"{self.path} was not written by srcr (no tokenizer metadata); export it with srcr")
        try:
            self._tokenizer = Tokenizer.from_str(decode_tokenizer(metadata[TOKENIZER_KEY]))
            self.quantization = json.loads(metadata.get(QUANTIZATION_KEY, "{}"))
            self.format_info = json.loads(metadata.get(FORMAT_KEY, "{}"))
        except Exception:  # zlib, base64, JSON and tokenizers errors alike: the metadata is damaged
            raise SrcrError(f"{self.path.name} holds damaged srcr metadata; re-export the artifact") from None
        self.facts = ModelFacts.from_json(metadata[MODEL_KEY])
        self._eos = set(self.facts.eos_token_ids)
        self._ort_version = ort.__version__
        self._cache: list[np.ndarray] = []
        self._check_inputs()

    def _check_inputs(self) -> None:
        present = {graph_input.name for graph_input in self._session.get_inputs()}
        missing = [name for name in input_names(self.facts.layers) if name not in present]
        if missing:
            raise SrcrError(f"{self.path} lacks graph inputs {missing[:3]}; re-export it with this srcr version")

    @property
    def vocab_size(self) -> int:
        return self.facts.vocab_size

    @property
    def context_length(self) -> int | None:
        return self.facts.context_length

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._tokenizer.decode([int(token) for token in tokens], skip_special_tokens=True)

    def _empty_cache(self) -> list[np.ndarray]:
        return [
            np.zeros((1, heads, 0, self.facts.head_dim), dtype=np.float32)
            for heads in self.facts.kv_heads  # per layer (ModelFacts.from_json made it a list)
            for _ in ("key", "value")
        ]

    def forward(self, tokens: Sequence[int], reset: bool, first_row: int) -> np.ndarray:
        if reset or not self._cache:
            self._cache = self._empty_cache()
        past_length = self._cache[0].shape[2]
        step = len(tokens)
        feed = {
            "input_ids": np.asarray([tokens], dtype=np.int64),
            "attention_mask": np.ones((1, past_length + step), dtype=np.int64),
            "position_ids": np.arange(past_length, past_length + step, dtype=np.int64)[None],
        }
        feed.update(zip(past_names(self.facts.layers), self._cache, strict=True))
        try:
            logits, *present = self._session.run(None, feed)
        except Exception as error:  # a crafted graph can fail at run time too
            raise SrcrError(f"ONNX Runtime failed on {self.path.name} ({str(error)[:200]}); re-export it") from None
        if logits.ndim != 3 or logits.shape[1] != step or logits.shape[2] != self.vocab_size:
            raise SrcrError(f"{self.path.name} returned logits of shape {logits.shape}; re-export it")
        self._cache = present
        return logits[0, first_row:]

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eos

    def info(self) -> dict[str, Any]:
        providers = self._session.get_providers()
        return {
            "runtime": "onnxruntime",
            "version": self._ort_version,
            "providers": providers,
            "device": "cuda" if CUDA in providers else "cpu",
            "intra_op_threads": self.threads,
            "opset": self.format_info.get("opset"),
            "bos_token_id": self.facts.bos_token_id,
            "eos_token_id": self.facts.eos_token_ids[0] if self.facts.eos_token_ids else None,
            "quantization": self.quantization.get("quant_type"),
        }

    def close(self) -> None:
        self._session = None
        self._tokenizer = None
        self._cache = []
