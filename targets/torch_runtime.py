"""A `Runtime` over an in-memory transformers model: the dense reference, and a test double.

The reference pack is built from the dense model through this adapter, so the base figures and
the deployed artifact's figures come from the very same evaluator code.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import transformers

from srcr.base.placement import placed
from srcr.base.runtime import DecoderRuntime
from srcr.targets.hf_tokens import chat_template_tokens, end_of_sequence_ids, prepended_bos

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class TorchRuntime(DecoderRuntime):
    """fp32 inference without gradients on a model already placed on `device` in float32.

    Use `TorchRuntime.borrowing` to have the model moved there and back: a stage borrows the
    model and leaves it where it found it.
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str = "cpu") -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._eos_ids = set(end_of_sequence_ids(model, tokenizer))
        self._cache: Any = None
        # transformers renames `past_key_values` to `cache` (deprecated from 5.x on); use what the model takes.
        parameters = inspect.signature(model.forward).parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._keeps_rows = "logits_to_keep" in parameters

    @classmethod
    @contextlib.contextmanager
    def borrowing(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: str = "cpu"
    ) -> Iterator[TorchRuntime]:
        """The model in float32 on `device` for the block, then every tensor back on its own device and dtype."""
        with placed(model, device=device, dtype=torch.float32):
            runtime = cls(model, tokenizer, device)
            try:
                yield runtime
            finally:
                runtime.close()

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def chat_tokens(self, prompt: str) -> list[int] | None:
        return chat_template_tokens(self.tokenizer, prompt)

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], reset: bool, first_row: int) -> np.ndarray:
        if reset or self._cache is None:
            self._cache = transformers.DynamicCache(config=self.model.config)
        input_ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        rows = len(tokens) - first_row
        # Only the asked-for rows go through the output projection (the vocabulary-wide matmul).
        keep = {"logits_to_keep": rows} if self._keeps_rows else {}
        output = self.model(input_ids=input_ids, **{self._cache_argument: self._cache}, use_cache=True, **keep)
        self._cache = next(output[key] for key in ("cache", "past_key_values") if key in output)
        return output.logits[0, -rows:].float().cpu().numpy()

    def is_end_of_generation(self, token: int) -> bool:
        return token in self._eos_ids

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "torch",
            "version": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(self.device),
            "dtype": "float32",
            "bos_token_id": prepended_bos(self.tokenizer),
            "eos_token_id": self.tokenizer.eos_token_id,
        }

    def close(self) -> None:
        self._cache = None
