"""Calibration and evaluation text: the user's files, or real English corpora shipped by installed packages.

Calibration uses gensim's Lee background corpus and evaluation its held-out Lee corpus, so no
text is ever both calibrated on and measured on.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporter.errors import SrcrError
from exporter.manifest import sha256_of

DEFAULT_SAMPLES = 128
DEFAULT_SEQ_LEN = 2048


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


def read_text(path: Path) -> str:
    """Plain text, or JSONL whose objects carry a `text` field (documents joined by blank lines)."""
    path = Path(path)
    if not path.is_file():
        raise SrcrError(f"text file {path} does not exist; pass an existing plain-text or JSONL file")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".jsonl" or raw.lstrip().startswith("{"):
        documents = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise SrcrError(f"{path}:{number} is not valid JSON; use one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise SrcrError(f'{path}:{number} has no string `text` field; JSONL lines need {{"text": ...}}')
            documents.append(record["text"])
        raw = "\n\n".join(documents)
    if not raw.strip():
        raise SrcrError(f"{path} holds no text; pass a file with real text")
    return raw


@dataclass
class CalibrationSet:
    input_ids: Any  # torch.LongTensor [n_samples, seq_len]
    source: str
    sha256: str
    n_samples: int
    seq_len: int
    corpus_tokens: int
    capped: bool  # True when the corpus could not supply the default request in full

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "sha256": self.sha256,
            "samples": self.n_samples,
            "seq_len": self.seq_len,
            "corpus_tokens": self.corpus_tokens,
            "capped_by_corpus": self.capped,
        }


def load_calibration(
    tokenizer: Any,
    calib_file: Path | None,
    n_samples: int | None,
    seq_len: int | None,
    seed: int,
) -> CalibrationSet:
    """Non-overlapping random windows of the tokenized corpus, as in the SparseGPT/Wanda papers.

    Defaults (128 x 2048) are capped by what the corpus holds; numbers the user asked for
    explicitly are honoured or refused, never silently shrunk.
    """
    import torch

    path = Path(calib_file) if calib_file else default_calibration_file()
    text = read_text(path)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    total = int(ids.numel())

    explicit_len = seq_len is not None
    explicit_samples = n_samples is not None
    seq_len = seq_len if explicit_len else DEFAULT_SEQ_LEN
    n_samples = n_samples if explicit_samples else DEFAULT_SAMPLES
    if seq_len < 8 or n_samples < 1:
        raise SrcrError("--seq-len must be at least 8 and --calib-samples at least 1")

    capped = False
    if total < seq_len:
        if explicit_len:
            raise SrcrError(
                f"{path.name} has {total} tokens, fewer than --seq-len {seq_len}; "
                "pass a longer --calib file or a smaller --seq-len"
            )
        seq_len, capped = total, True
    available = total // seq_len
    if available < n_samples:
        if explicit_samples:
            raise SrcrError(
                f"{path.name} has {total} tokens, enough for {available} samples of {seq_len}, not "
                f"--calib-samples {n_samples}; pass a longer --calib file or fewer --calib-samples"
            )
        n_samples, capped = available, True

    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:n_samples].sort().values
    windows = ids[: available * seq_len].view(available, seq_len)[chosen]
    return CalibrationSet(
        input_ids=windows.contiguous(),
        source=str(path),
        sha256=sha256_of(path),
        n_samples=n_samples,
        seq_len=seq_len,
        corpus_tokens=total,
        capped=capped,
    )
