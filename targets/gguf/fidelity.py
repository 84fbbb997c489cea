"""Does llama.cpp run the converted file as PyTorch runs the model? Checked before anything is rounded.

A converter can write a file that loads and runs yet computes another model: a family quirk it does not
know (a Gemma 3 whose `layer_types` do not follow the sliding-window pattern llama.cpp assumes places its
full-attention layers wrongly). Every later figure would then measure the converter, not the compression.
So the unrounded file (the quantizer's lossless input) and the model in PyTorch are run on the same tokens,
and the export stops when their next-token distributions differ by more than arithmetic does.

The tokens are prose from Python's own documentation (`pydoc_data`, always installed), long enough to
reach past a sliding window: positions inside the window cannot tell a sliding layer from a full one, so
only the last `SCORED` positions are compared, which also bounds the logits' memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from srcr.base.errors import SrcrError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Mean KL(PyTorch || llama.cpp) over the scored positions above which the file is refused. A correct
# conversion differs only by summation order and, for 16-bit weights, llama.cpp rounding activations to
# bfloat16 (measured 1e-8 in float32 on the tests' models, 1e-5 on SmolLM2, 9e-5 on SmolLM2 in bfloat16);
# a misread layout by far more (0.18 for Gemma 3 with its layer types alternating; docs/gguf.md).
MAX_MEAN_KL = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 1e-2}
SKIP_CHECK_VARIABLE = "SRCR_SKIP_CONVERSION_CHECK"
SCORED = 128
MIN_TOKENS = 256
BEYOND_WINDOW = 128


def check_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> list[int]:
    """Token ids of fixed prose, long enough to reach `BEYOND_WINDOW` past the model's sliding window."""
    from pydoc_data.topics import topics

    config = model.config
    window = int(getattr(config, "sliding_window", None) or 0)
    limit = int(getattr(config, "max_position_embeddings", None) or MIN_TOKENS)
    count = min(limit, max(MIN_TOKENS, window + BEYOND_WINDOW))
    text = "\n\n".join(topics[key] for key in sorted(topics))
    vocabulary = int(getattr(config, "vocab_size", None) or 0) or None
    ids = tokenizer(text[: 8 * count], add_special_tokens=False)["input_ids"]
    # A tokenizer may know tokens the model's embedding has no row for; the check uses only the model's.
    return [token for token in ids if vocabulary is None or token < vocabulary][:count]


def torch_logprobs(model: PreTrainedModel, tokens: list[int], scored: int) -> np.ndarray:
    """float32 [scored, vocab]: PyTorch's next-token log-probabilities at the last `scored` positions.

    Computed in float32 whatever the model's dtype: llama.cpp reads the stored 16-bit weights exactly and
    computes in float32, while PyTorch in bfloat16 rounds every activation (a 0.0125 mean KL on the
    tests' bfloat16 model, nothing to do with the conversion). Every tensor is given back as it was.
    """
    import torch

    from srcr.base.placement import placed

    device = next(model.parameters()).device
    with placed(model, device=device, dtype=torch.float32), torch.no_grad():
        output = model(torch.tensor([tokens], device=device), logits_to_keep=scored)
        return torch.log_softmax(output.logits[0, -scored:].float(), -1).cpu().numpy()


def conversion_kl(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path) -> float:
    """Mean KL(PyTorch || llama.cpp on `path`) over the last `SCORED` positions of `check_tokens`."""
    from srcr.targets.gguf.runtime import LlamaCppRuntime

    tokens = check_tokens(tokenizer, model)
    scored = min(SCORED, len(tokens) // 2)  # a model with a short context: its second half
    runtime = LlamaCppRuntime(Path(path), n_ctx=len(tokens))
    try:
        got = runtime.logprobs(tokens, first_row=len(tokens) - scored)
    finally:
        runtime.close()
    reference = torch_logprobs(model, tokens, scored)
    if got.shape != reference.shape:
        raise SrcrError(
            f"llama.cpp's file has a vocabulary of {got.shape[-1]} where the model has {reference.shape[-1]}; "
            "the converter did not reproduce the model"
        )
    return float((np.exp(reference) * (reference - got)).sum(-1).mean())


def check_reproduces(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: Path, dtype: str) -> float:
    """The measured mean KL; SrcrError when it is over `MAX_MEAN_KL` for the model's dtype."""
    kl = conversion_kl(model, tokenizer, path)
    limit = MAX_MEAN_KL.get(dtype, MAX_MEAN_KL["float32"])
    if not np.isfinite(kl) or kl > limit:
        model_type = getattr(model.config, "model_type", "this model")
        raise SrcrError(
            f"llama.cpp does not reproduce the converted {model_type} model (mean KL {kl:.3g} against PyTorch "
            f"on the unrounded file, over {limit:g}): the converter misreads part of its config; use --format "
            f"onnx, or {SKIP_CHECK_VARIABLE}=1 to export it anyway"
        )
    return kl
