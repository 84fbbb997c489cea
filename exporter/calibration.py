"""Calibration and evaluation text: the user's files, or real English corpora shipped by installed packages.

Calibration uses gensim's Lee background corpus and evaluation its held-out Lee corpus, so no
text is ever both calibrated on and measured on. Text is decoded strictly: a file that is not
UTF-8 is refused with the option that names its encoding, and binary data is refused outright, so
pruning never runs on U+FFFD replacement characters or junk.
"""

from __future__ import annotations

import codecs
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from srcr.base.errors import SrcrError
from srcr.base.files import sha256_of

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048
# gensim's Lee corpora are ISO-8859-1 (lee.cor has a pound sign as byte 0xa3).
DEFAULT_CORPUS_ENCODING = "latin-1"
MAX_TEXT_BYTES = 2 << 30
_BINARY_SAMPLE = 1 << 16
_CONTROL_BYTES = frozenset(range(32)) - {9, 10, 12, 13}  # tab, newline, form feed, carriage return


def _gensim_test_file(name: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise SrcrError("the default corpora come with gensim; run `pip install gensim` or pass --calib FILE")
    path = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / name
    if not path.is_file():
        raise SrcrError(f"{path} is missing from gensim; reinstall gensim or pass your own text file")
    return path


def default_calibration_file() -> Path:
    return _gensim_test_file("lee_background.cor")


def default_eval_file() -> Path:
    return _gensim_test_file("lee.cor")


@dataclass(frozen=True)
class TextSource:
    """A text file as read: its content, which encoding decoded it, and its digest."""

    path: Path
    text: str
    encoding: str
    sha256: str


def _check_encoding_name(encoding: str, option: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        raise SrcrError(
            f"{option}-encoding {encoding!r} is not an encoding Python knows; e.g. utf-8, latin-1, cp1252"
        ) from None


def _looks_binary(data: bytes) -> bool:
    sample = data[:_BINARY_SAMPLE]
    if b"\0" in sample:
        return True
    controls = sum(1 for byte in sample if byte in _CONTROL_BYTES)
    return controls > 0.01 * max(1, len(sample))


def decode_text(data: bytes, path: Path, encoding: str | None, option: str) -> tuple[str, str]:
    """(text, encoding used): `encoding` if given, else UTF-8 (with or without a BOM), else a refusal."""
    if _looks_binary(data):
        raise SrcrError(f"{option} {path} looks like binary data, not text; pass a plain-text or JSONL file")
    if encoding is not None:
        name = _check_encoding_name(encoding, option)
        try:
            return data.decode(name), name
        except UnicodeDecodeError as error:
            raise SrcrError(
                f"{option} {path} is not {name} (byte 0x{data[error.start]:02x} at offset {error.start}); "
                f"pass its real encoding with {option}-encoding"
            ) from None
    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as error:
        raise SrcrError(
            f"{option} {path} is not UTF-8 (byte 0x{data[error.start]:02x} at offset {error.start}); "
            f"pass its encoding, e.g. {option}-encoding latin-1"
        ) from None


def read_text(path: Path, encoding: str | None = None, option: str = "--calib") -> TextSource:
    """Plain text, or JSONL whose objects carry a `text` field (documents joined by blank lines)."""
    path = Path(path)
    if path.is_dir():
        raise SrcrError(f"{option} {path} is a folder; pass a plain-text or JSONL file")
    if not path.is_file():
        raise SrcrError(f"{option} {path} does not exist; pass an existing plain-text or JSONL file")
    if path.stat().st_size > MAX_TEXT_BYTES:
        raise SrcrError(f"{option} {path} is larger than 2 GiB; pass a smaller sample of the text")
    data = path.read_bytes()
    raw, used = decode_text(data, path, encoding, option)
    if path.suffix == ".jsonl" or raw.lstrip().startswith("{"):
        raw = _jsonl_documents(raw, path)
    if not raw.strip():
        raise SrcrError(f"{option} {path} holds no text; pass a file with real text")
    return TextSource(path=path, text=raw, encoding=used, sha256=sha256_of(path))


def _jsonl_documents(raw: str, path: Path) -> str:
    documents = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise SrcrError(f"{path}:{number} is not valid JSON; use one JSON object per line") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SrcrError(f'{path}:{number} has no string `text` field; JSONL lines need {{"text": ...}}')
        documents.append(record["text"])
    return "\n\n".join(documents)


def calibration_text(calib_file: Path | None, encoding: str | None) -> TextSource:
    if calib_file is None:
        return read_text(default_calibration_file(), encoding or DEFAULT_CORPUS_ENCODING, "--calib")
    return read_text(calib_file, encoding, "--calib")


def evaluation_text(eval_file: Path | None, encoding: str | None) -> TextSource:
    if eval_file is None:
        return read_text(default_eval_file(), encoding or DEFAULT_CORPUS_ENCODING, "--eval-text")
    return read_text(eval_file, encoding, "--eval-text")


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # long [n_samples, seq_len]
    source: str
    sha256: str
    encoding: str
    n_samples: int
    seq_len: int
    corpus_tokens: int
    capped: bool  # True when the corpus could not supply the default request in full


def check_calibration_request(n_samples: int | None, seq_len: int | None) -> None:
    """The numbers alone, before any file or model is read."""
    if (seq_len is not None and seq_len < 8) or (n_samples is not None and n_samples < 1):
        raise SrcrError("--seq-len must be at least 8 and --calib-samples at least 1")


def load_calibration(
    tokenizer: PreTrainedTokenizerBase,
    source: TextSource,
    n_samples: int | None,
    seq_len: int | None,
    seed: int,
) -> CalibrationSet:
    """Non-overlapping random windows of the tokenized corpus, as in the SparseGPT/Wanda papers.

    Defaults (128 x 2048) are capped by what the corpus holds; numbers the user asked for
    explicitly are honoured or refused, never silently shrunk.
    """
    import torch

    check_calibration_request(n_samples, seq_len)
    ids = torch.tensor(tokenizer(source.text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    total = int(ids.numel())

    explicit_len = seq_len is not None
    explicit_samples = n_samples is not None
    seq_len = seq_len if explicit_len else DEFAULT_SEQ_LEN
    n_samples = n_samples if explicit_samples else DEFAULT_SAMPLES

    capped = False
    name = source.path.name
    if total < seq_len:
        if explicit_len:
            raise SrcrError(
                f"{name} has {total} tokens, fewer than --seq-len {seq_len}; "
                "pass a longer --calib file or a smaller --seq-len"
            )
        seq_len, capped = total, True
    available = total // seq_len
    if available < n_samples:
        if explicit_samples:
            raise SrcrError(
                f"{name} has {total} tokens, enough for {available} samples of {seq_len}, not "
                f"--calib-samples {n_samples}; pass a longer --calib file or fewer --calib-samples"
            )
        n_samples, capped = available, True

    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:n_samples].sort().values
    windows = ids[: available * seq_len].view(available, seq_len)[chosen]
    return CalibrationSet(
        input_ids=windows.contiguous(),
        source=str(source.path),
        sha256=source.sha256,
        encoding=source.encoding,
        n_samples=n_samples,
        seq_len=seq_len,
        corpus_tokens=total,
        capped=capped,
    )
