"""A `Runtime` over an in-memory transformers model: the dense reference, and a test double.

The reference pack is built from the dense model through this adapter, so the base figures and
the deployed artifact's figures come from the very same evaluator code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import transformers
from transformers import GenerationConfig


class TorchRuntime:
    """fp32 inference without gradients. The model is cast to float32 and moved to `device` in place."""

    def __init__(self, model: Any, tokenizer: Any, device: str = "cpu") -> None:
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self._eos_ids = self._end_of_sequence_ids()

    def _end_of_sequence_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return []
        return [eos] if isinstance(eos, int) else list(eos)

    def _bos_prepended(self) -> int | None:
        """The BOS id if this tokenizer opens plain text with it, else None."""
        bos = self.tokenizer.bos_token_id
        with_special = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        return bos if bos is not None and with_special[:1] == [bos] else None

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def chat_tokens(self, prompt: str) -> list[int] | None:
        """The prompt as a single user turn in the model's chat template, ready for the reply."""
        if not getattr(self.tokenizer, "chat_template", None):
            return None
        encoded = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding here; 4.x returned the id list itself.
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return [int(token) for token in ids]

    def _input(self, tokens: Sequence[int]) -> torch.Tensor:
        return torch.tensor([list(tokens)], dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def logprobs(self, tokens: Sequence[int]) -> np.ndarray:
        logits = self.model(input_ids=self._input(tokens), use_cache=False).logits[0]
        return torch.log_softmax(logits.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def generate(self, tokens: Sequence[int], max_new_tokens: int) -> list[int]:
        input_ids = self._input(tokens)
        config = GenerationConfig(
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=self._eos_ids or None,
            pad_token_id=self._eos_ids[0] if self._eos_ids else None,
        )
        output = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
        new = output[0, input_ids.shape[1] :].tolist()
        # The end-of-sequence token ends the reply; it is not part of it.
        if new and new[-1] in self._eos_ids:
            new = new[:-1]
        return new

    def info(self) -> dict[str, Any]:
        return {
            "runtime": "torch",
            "version": torch.__version__,
            "transformers": transformers.__version__,
            "device": str(self.device),
            "dtype": "float32",
            "bos_token_id": self._bos_prepended(),
        }

    def close(self) -> None:
        self.model = None
        self.tokenizer = None
