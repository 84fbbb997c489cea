"""Tokenizer metadata for a GGUF file, read from an in-memory Hugging Face fast tokenizer.

llama.cpp tokenizes by itself from `tokenizer.ggml.*`, so these keys must describe a tokenizer it
implements: byte-level BPE ("gpt2" plus a named pre-tokenizer regex set) or SentencePiece-style BPE
with byte fallback ("llama"). Everything comes from the tokenizer object; the default model's
tokenizer was rebuilt by transformers from a GGUF and has no folder of tokenizer files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import gguf

from srcr.base.errors import SrcrError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Pre-tokenizer names written by this module's own detection; a caller's hint may name any other
# pre-tokenizer llama.cpp knows (the written file is load-checked by llama.cpp afterwards).
DETECTED_BPE_PRE = ("smollm", "llama-bpe", "qwen2", "gpt-2")

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPM_SPACE = "\u2581"


@dataclass
class TokenizerMetadata:
    model: str  # tokenizer.ggml.model: "gpt2" or "llama"
    pre: str | None  # tokenizer.ggml.pre (byte-level BPE only)
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos" -> id, ...
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, token_id in self.special_ids.items():
            getattr(writer, f"add_{kind}_token_id")(token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def tokenizer_metadata(
    tokenizer: PreTrainedTokenizerBase, n_vocab: int, hints: Mapping[str, object] | None = None
) -> TokenizerMetadata:
    """Describe `tokenizer` for llama.cpp, padded to the model's `n_vocab` embedding rows."""
    spec = _tokenizer_json(tokenizer)
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise SrcrError(
            f"the GGUF target supports BPE tokenizers only, this one is {model.get('type')!r}; "
            "export this model with --format onnx"
        )
    hints = hints or {}
    if model.get("byte_fallback"):
        meta = _sentencepiece_bpe(tokenizer, spec, n_vocab)
    else:
        pre = hints.get("tokenizer_pre") or detect_bpe_pre(spec)
        meta = _byte_level_bpe(tokenizer, spec, n_vocab, pre)
    meta.special_ids = _special_ids(tokenizer, n_vocab)
    meta.add_bos, meta.add_eos = _adds_bos_eos(tokenizer)
    template = getattr(tokenizer, "chat_template", None)
    meta.chat_template = template if isinstance(template, str) else None
    return meta


def detect_bpe_pre(spec: dict[str, Any]) -> str:
    """Name llama.cpp's pre-tokenizer that splits text like the tokenizer's own pre-tokenizer does."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if "ByteLevel" in kinds and any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts):
        return "smollm"
    split = next((p for p in parts if p.get("type") == "Split"), None)
    if split is not None:
        regex = split.get("pattern", {}).get("Regex", "")
        # Llama-3 and Qwen2 share one regex except for how many digits a number chunk may hold.
        if r"\p{N}{1,3}" in regex:
            return "llama-bpe"
        if r"|\p{N}|" in regex:
            return "qwen2"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise SrcrError(
        "cannot tell which llama.cpp pre-tokenizer matches this tokenizer; "
        f"pass hints={{'tokenizer_pre': NAME}} (e.g. one of {', '.join(DETECTED_BPE_PRE)})"
    )


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SrcrError("the GGUF target needs a fast (tokenizers-backed) tokenizer; load it with use_fast=True")
    return json.loads(backend.to_str())


def _byte_level_bpe(tokenizer: Any, spec: dict[str, Any], n_vocab: int, pre: str) -> TokenizerMetadata:
    tokens, types = _tokens_and_types(tokenizer, n_vocab, byte_tokens=False)
    return TokenizerMetadata(model="gpt2", pre=pre, tokens=tokens, token_types=types, scores=None, merges=_merges(spec))


def _sentencepiece_bpe(tokenizer: Any, spec: dict[str, Any], n_vocab: int) -> TokenizerMetadata:
    tokens, types = _tokens_and_types(tokenizer, n_vocab, byte_tokens=True)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < n_vocab:
        types[tokenizer.unk_token_id] = gguf.TokenType.UNKNOWN
    return TokenizerMetadata(
        model="llama",
        pre=None,
        tokens=tokens,
        token_types=types,
        scores=_merge_rank_scores(spec, tokens),
        merges=[],
        add_space_prefix=_adds_space_prefix(spec),
    )


def _tokens_and_types(tokenizer: Any, n_vocab: int, byte_tokens: bool) -> tuple[list[str], list[int]]:
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= n_vocab:
        raise SrcrError(
            f"tokenizer has ids up to {max(by_id)} but the model embeds only {n_vocab}; "
            "pass the tokenizer that belongs to this model"
        )
    added = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for token_id in range(n_vocab):
        if token_id in added:
            tokens.append(added[token_id].content)
            special = added[token_id].special
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        elif token_id in by_id:
            token = by_id[token_id]
            tokens.append(token)
            is_byte = byte_tokens and _BYTE_TOKEN.fullmatch(token)
            types.append(gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL)
        else:
            # Embedding rows past the tokenizer's vocabulary (padding to a round size).
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types]


def _merges(spec: dict[str, Any]) -> list[str]:
    merges = spec.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], str):
        return list(merges)
    # Pair form (tokenizers >= 0.20); GGUF stores "left right", so a literal space inside a part is
    # written shifted by 256, as llama.cpp reads it back.
    return [" ".join(part.replace(" ", chr(ord(" ") + 256)) for part in pair) for pair in merges]


def _merge_rank_scores(spec: dict[str, Any], tokens: list[str]) -> list[float]:
    """SentencePiece scores: llama.cpp merges the bigram whose result scores highest.

    A BPE merge list orders merges by priority, so each merged token scores minus the rank of the
    first merge that produces it; tokens no merge produces keep 0 (they are never merge results).
    """
    token_ids = {token: token_id for token_id, token in enumerate(tokens)}
    scores = [0.0] * len(tokens)
    seen: set[int] = set()
    for rank, pair in enumerate(spec.get("model", {}).get("merges") or []):
        left, right = pair.split(" ", 1) if isinstance(pair, str) else pair
        token_id = token_ids.get(left + right)
        if token_id is not None and token_id not in seen:
            seen.add(token_id)
            scores[token_id] = -float(rank + 1)
    return scores


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    def walk(node: Any) -> list[dict[str, Any]]:
        if not isinstance(node, dict):
            return []
        children = node.get("pretokenizers") or node.get("normalizers") or []
        return [node, *[n for child in children for n in walk(child)]]

    for node in walk(spec.get("normalizer")) + walk(spec.get("pre_tokenizer")):
        if node.get("type") == "Prepend" and node.get("prepend") == _SPM_SPACE:
            return True
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
    return False


def _special_ids(tokenizer: Any, n_vocab: int) -> dict[str, int]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {kind: token_id for kind, token_id in ids.items() if token_id is not None and 0 <= token_id < n_vocab}


def _adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether the tokenizer's own post-processing puts BOS/EOS around plain text."""
    probe = "Hello world"
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos
