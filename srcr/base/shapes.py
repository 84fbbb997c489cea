"""The shapes of a Llama-style decoder, read from its config alone (before any weight is loaded)."""

from __future__ import annotations

from typing import Any


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def linear_input_dims(config: Any) -> dict[str, int]:
    """The input dimension of each kind of weight matrix: what block and N:M patterns must divide.

    Raises AttributeError when the config is not a Llama-style decoder's.
    """
    return {
        "q/k/v, gate/up and lm_head": int(config.hidden_size),
        "o_proj": int(config.num_attention_heads * head_dim(config)),
        "down_proj": int(config.intermediate_size),
    }
