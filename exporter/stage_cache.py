"""A content-addressed cache of finished stages, shared by every sweep on the machine (or cluster folder).

An entry is a folder named by the sha256 of what produced it: the stage's kind, srcr's version, the
libraries' versions and the stage's own inputs (for a configuration: its resolved recipe without the paths
its digests already cover, and the reference pack it was measured against). An entry holds its files and
`entry.json`, the sha256 of each. It is written under a temporary name and renamed whole, so a crash leaves
no entry, only a temporary folder that the next write removes; and every file is checked against its digest
before reuse (a damaged entry is removed and the stage runs again). Layout: docs/sweep.md#the-stage-cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srcr.base.files import atomic_path, remove_stale_partials, sha256_of, temp_name

CACHE_ENV = "SRCR_STAGE_CACHE"
ENTRY_FILE = "entry.json"
MAX_ENTRY_BYTES = 1 << 20


def default_cache_root() -> Path:
    """$SRCR_STAGE_CACHE, else `stages/` in srcr's per-machine cache (~/.cache/srcr, or $SRCR_CACHE_DIR)."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    from srcr.exporter.models import cache_dir

    return cache_dir() / "stages"


def stage_key(kind: str, inputs: Mapping[str, Any]) -> str:
    """The sha256 naming an entry: the kind, srcr's and the libraries' versions, and the stage's inputs."""
    from srcr import __version__
    from srcr.exporter.manifest import library_versions

    identity = {"kind": kind, "srcr": __version__, "versions": library_versions(), "inputs": inputs}
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class StageCache:
    root: Path

    def folder(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> dict[str, Path] | None:
        """The entry's files by name, each checked against its digest; None when absent or damaged."""
        folder = self.folder(kind, key)
        files = _checked_files(folder)
        if files is None and folder.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)  # damaged: the stage runs again and writes it anew
        return files

    def put(self, kind: str, key: str, files: Mapping[str, Path]) -> None:
        """Store copies of `files` (name -> path) as the entry; an entry already there is kept."""
        final = self.folder(kind, key)
        if final.exists():
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(final.parent)
        tmp = final.parent / temp_name(key)
        tmp.mkdir()
        try:
            digests = {}
            for name, source in files.items():
                _link_or_copy(Path(source), tmp / name)
                digests[name] = sha256_of(tmp / name)
            (tmp / ENTRY_FILE).write_text(json.dumps({"files": digests}, indent=2), encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:  # another writer finished the same entry first: theirs is as good
                if not final.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _checked_files(folder: Path) -> dict[str, Path] | None:
    entry = folder / ENTRY_FILE
    try:
        if not entry.is_file() or entry.stat().st_size > MAX_ENTRY_BYTES:
            return None
        digests = json.loads(entry.read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(digests, dict) or not digests:
        return None
    files = {}
    for name, digest in digests.items():
        path = folder / str(name)
        # Names stay inside the entry; a file that changed since it was stored is not reused.
        if Path(str(name)).name != name or not path.is_file() or path.is_symlink() or sha256_of(path) != digest:
            return None
        files[name] = path
    return files


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same file system: no second copy of a multi-GB artifact
    except OSError:
        shutil.copyfile(source, target)


def restore(source: Path, final: Path) -> None:
    """Put a cached file at `final` atomically (a link where the file systems allow, else a copy)."""
    with atomic_path(final, overwrite=True) as tmp:
        tmp.unlink()
        _link_or_copy(source, tmp)
