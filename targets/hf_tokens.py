"""Special-token rules of a Hugging Face model, in one place for every runtime built from one.

The dense reference (PyTorch) and the ONNX artifact (which stores these ids in its metadata) must
end generation and open text exactly alike, or the reference pack would compare unlike things.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def end_of_sequence_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The generation config's EOS ids first (chat models end turns there), else the tokenizer's."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(token) for token in eos]


def prepended_bos(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The BOS id if the tokenizer opens plain text with it (the evaluators prepend it themselves)."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if bos is not None and with_special[:1] == [bos] else None


def chat_template_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int] | None:
    """The prompt as a single user turn in the model's chat template, ready for the reply; None without one."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    # transformers 5 returns a BatchEncoding here; 4.x returned the id list itself.
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(token) for token in ids]
