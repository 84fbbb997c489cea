"""The GGUF artifact run by llama.cpp, behind the evaluators' `Runtime` interface.

srcr drives llama.cpp's C API (through llama-cpp-python's bindings) directly rather than through
`llama_cpp.Llama`, for three reasons: the model parameters must be chosen per CPU (see
`cpu_buffers`), logits are copied out only for the rows an evaluator scores, and no n_ctx × vocab
score buffer is allocated.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import llama_cpp as capi

from srcr.base.errors import SrcrError
from srcr.base.runtime import DecoderRuntime, available_threads, use_accelerator
from srcr.targets.gguf.backends import CpuBufferPlan, gpu_backend_name, plan_cpu_buffers
from srcr.targets.gguf.llama_log import captured_llama_log, failure_reason

DEFAULT_N_CTX = 2048
N_UBATCH = 512  # llama.cpp's default physical batch


def gpu_layers_for(device: str) -> int:
    """llama.cpp's n_gpu_layers for a --device choice: all layers on the GPU when there is one."""
    has_gpu = bool(capi.llama_supports_gpu_offload())
    use = use_accelerator(device, has_gpu, 'reinstall llama-cpp-python with CMAKE_ARGS="-DGGML_CUDA=on"')
    return -1 if use else 0


class LlamaCppRuntime(DecoderRuntime):
    """One GGUF model and one llama.cpp context; the KV cache holds the sequence between `forward` calls."""

    def __init__(
        self,
        path: Path,
        n_ctx: int = DEFAULT_N_CTX,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        cpu_buffers: CpuBufferPlan | None = None,
    ) -> None:
        self.path = Path(path)
        self.n_threads = n_threads or available_threads()
        self.n_gpu_layers = n_gpu_layers
        self.cpu_buffers = cpu_buffers or plan_cpu_buffers()
        self._model = self._context = None
        self._batch = None
        capi.llama_backend_init()
        self._load_model()
        self._vocab = capi.llama_model_get_vocab(self._model)
        self._n_vocab = int(capi.llama_vocab_n_tokens(self._vocab))
        self._create_context(n_ctx)
        self._n_past = 0

    def _load_model(self) -> None:
        if not self.path.is_file():
            raise SrcrError(f"{self.path} does not exist; pass the .gguf file written by srcr export")
        params = capi.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers == -1 else self.n_gpu_layers
        params.use_extra_bufts = self.cpu_buffers.use_extra_buffers
        with captured_llama_log() as log:
            model = capi.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not model:
            reason = failure_reason(log, "error loading model:")
            raise SrcrError(f"llama.cpp could not load {self.path.name} ({reason}); re-export the artifact")
        self._model = model

    def _create_context(self, n_ctx: int) -> None:
        params = capi.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_ctx  # a whole window in one llama_decode
        params.n_ubatch = min(N_UBATCH, n_ctx)
        params.n_seq_max = 1
        params.n_threads = self.n_threads
        params.n_threads_batch = self.n_threads
        with captured_llama_log() as log:
            context = capi.llama_init_from_model(self._model, params)
        if not context:
            raise SrcrError(
                f"llama.cpp could not create a context for {self.path.name}: {failure_reason(log, 'error')}"
            )
        self._context = context
        # llama.cpp may round the context up; the batch holds what was asked for.
        self._n_ctx = min(n_ctx, int(capi.llama_n_ctx(context)))
        self._batch = capi.llama_batch_init(self._n_ctx, 0, 1)
        for index in range(self._n_ctx):  # one sequence: every token belongs to sequence 0
            self._batch.seq_id[index][0] = 0

    @property
    def vocab_size(self) -> int:
        return self._n_vocab

    @property
    def context_length(self) -> int:
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buffer = (capi.llama_token * capacity)()
            count = capi.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, False)
            if count >= 0:
                return list(buffer[:count])
            capacity = -count

    def detokenize(self, tokens: Sequence[int]) -> str:
        ids = (capi.llama_token * max(1, len(tokens)))(*[int(token) for token in tokens])
        capacity = 8 * len(tokens) + 16
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            count = capi.llama_detokenize(self._vocab, ids, len(tokens), buffer, capacity, False, False)
            if count >= 0:
                return buffer.raw[:count].decode("utf-8", errors="replace")
            capacity = -count

    def forward(self, tokens: Sequence[int], reset: bool, first_row: int) -> np.ndarray:
        if reset:
            capi.llama_memory_clear(capi.llama_get_memory(self._context), True)
            self._n_past = 0
        count = len(tokens)
        if self._n_past + count > self._n_ctx:
            raise SrcrError(f"{self._n_past + count} tokens exceed the GGUF runtime's context of {self._n_ctx}")
        batch = self._batch
        batch.n_tokens = count
        np.ctypeslib.as_array(batch.token, shape=(count,))[:] = tokens
        np.ctypeslib.as_array(batch.pos, shape=(count,))[:] = np.arange(self._n_past, self._n_past + count)
        np.ctypeslib.as_array(batch.n_seq_id, shape=(count,))[:] = 1
        wanted = np.zeros(count, dtype=np.int8)
        wanted[first_row:] = 1
        np.ctypeslib.as_array(batch.logits, shape=(count,))[:] = wanted
        with captured_llama_log() as log:
            status = capi.llama_decode(self._context, batch)
        if status != 0:
            reason = failure_reason(log, "error:") if log else f"llama_decode returned {status}"
            raise SrcrError(f"llama.cpp could not evaluate {count} tokens of {self.path.name} ({reason})")
        self._n_past += count
        rows = count - first_row
        logits = capi.llama_get_logits(self._context)
        return np.ctypeslib.as_array(logits, shape=(rows, self._n_vocab)).copy()

    def is_end_of_generation(self, token: int) -> bool:
        return bool(capi.llama_vocab_is_eog(self._vocab, token))

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "llama.cpp",
            "llama_cpp_python": llama_cpp.__version__,
            "backend": gpu_backend_name() if self.n_gpu_layers != 0 else "cpu",
            "n_threads": self.n_threads,
            "n_ctx": self._n_ctx,
            "cpu_extra_buffer_types": list(self.cpu_buffers.available),
            "extra_buffer_types_used": self.cpu_buffers.use_extra_buffers,
            "extra_buffer_types_reason": self.cpu_buffers.reason,
            # the BOS llama.cpp opens a text with, if its vocabulary says to add one
            "bos_token_id": int(capi.llama_vocab_bos(self._vocab))
            if capi.llama_vocab_get_add_bos(self._vocab)
            else None,
        }

    def close(self) -> None:
        with captured_llama_log():  # llama.cpp reports buffer sizes as it frees them
            if self._batch is not None:
                capi.llama_batch_free(self._batch)
                self._batch = None
            if self._context:
                capi.llama_free(self._context)
                self._context = None
            if self._model:
                capi.llama_model_free(self._model)
                self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the bindings may be gone already
            self.close()
