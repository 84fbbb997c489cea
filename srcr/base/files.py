"""Files srcr writes: complete or not at all, never over an existing file unless asked, never interleaved.

- Everything is written under a temporary name in the destination folder and renamed into place
  when complete; an error, Ctrl-C or full disk removes the temporary file.
- A temporary name carries its writer's identity (host, pid, process start time):
  `.<final name>.srcr-<host>-<pid>-<start>-<random>.partial`. A process killed outright (SIGKILL,
  a crash, power loss) cannot clean up, so the next run in that folder removes the temporary files
  whose writer is dead, and never those of a live concurrent run.
- Runs that would write the same files take an advisory lock first (`output_lock`); the kernel
  drops it when its holder dies, however it dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError

TEMP_SUFFIX = ".partial"
LOCK_SUFFIX = ".srcr-lock"
_TEMP_NAME = re.compile(r"^\..+\.srcr-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]{8}\.partial$")
# Errors that mean "this destination cannot take the file", whatever was being written.
_DESTINATION_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
MAX_NAME_BYTES = 200  # leaves room for suffixes and temporary-name decorations within NAME_MAX (255)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_ticks(pid: int) -> int | None:
    """A process's start time in centiseconds, or None if no such process is alive."""
    import psutil

    try:
        return int(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:
        return -1  # alive, start time unknown


def temp_name(final_name: str) -> str:
    ticks = _start_ticks(os.getpid())
    return f".{final_name}.srcr-{_host_tag()}-{os.getpid()}-{ticks}-{secrets.token_hex(4)}{TEMP_SUFFIX}"


def writer_alive(name: str) -> bool | None:
    """Whether the process that made temporary file `name` still runs; None when srcr cannot tell
    (not one of its names, or made on another host sharing the folder)."""
    match = _TEMP_NAME.match(name)
    if match is None or match["host"] != _host_tag():
        return None
    ticks = _start_ticks(int(match["pid"]))
    if ticks is None:
        return False
    # A pid reused by a later process has another start time (clock ticks: allow rounding).
    return ticks == -1 or abs(ticks - int(match["start"])) <= 1


def remove_stale_partials(folder: Path) -> list[Path]:
    """Remove the temporary files and folders of dead srcr writers in `folder`; return what went."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if writer_alive(entry.name) is not False:
            continue
        with contextlib.suppress(FileNotFoundError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


def check_file_name(name: str, option: str = "--name") -> str:
    """A name given for an output file must be a plain file name, so nothing lands outside --out."""
    problem = None
    if not name or name.strip() != name:
        problem = "is empty or starts/ends with whitespace"
    elif "/" in name or "\\" in name or "\0" in name:
        problem = "contains a path separator"
    elif name in (".", "..") or name.startswith("."):
        problem = "starts with a dot"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif any(unicodedata.category(char) in ("Cc", "Cf") for char in name):
        problem = "contains control or bidirectional-format characters"
    if problem:
        raise SrcrError(f"{option} {name!r} {problem}; pass a plain file name and choose the folder with --out")
    return name


def contained_file(folder: Path, name: Any, what: str) -> Path:
    """`folder/name` for a file name read from an untrusted file, refusing anything that leaves `folder`."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise SrcrError(
            f"{what} {name!r} is not a plain file name beside the manifest; the manifest is not trustworthy"
        )
    path = Path(folder) / name
    resolved_folder = Path(folder).resolve()
    if path.resolve().parent != resolved_folder:
        raise SrcrError(f"{what} {name!r} leads outside {folder} (a link?); keep the files beside the manifest")
    return path


def existing_ancestor(path: Path) -> Path:
    """`path` itself when it exists, else the nearest of its parents that does (a folder made later lies there)."""
    ancestor = Path(path)
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    return ancestor


def check_output_folder(folder: Path, option: str = "--out") -> None:
    """Fail before any expensive work if `folder` cannot receive files."""
    folder = Path(folder)
    if folder.exists():
        if not folder.is_dir():
            raise SrcrError(f"{option} {folder} is a file, not a folder; pass a folder (it is created if missing)")
        _probe_writable(folder, option)
        return
    ancestor = existing_ancestor(folder)
    if not ancestor.is_dir():
        raise SrcrError(f"{option} {folder} lies under {ancestor}, which is a file; pass another folder")
    _probe_writable(ancestor, option, created=folder)


def _probe_writable(folder: Path, option: str, created: Path | None = None) -> None:
    probe = folder / temp_name("write-probe")
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as error:
        where = f"{created} (under {folder})" if created else str(folder)
        raise SrcrError(
            f"{option} {where} is not writable ({error.strerror}); choose a folder you can write to"
        ) from None


@contextlib.contextmanager
def output_folder(folder: Path) -> Iterator[Path]:
    """Create `folder` if needed; if the block fails and the folder was created for it, remove it again
    when it is still empty (no empty folders left behind by a failed or interrupted run)."""
    folder = Path(folder)
    missing = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    except BaseException:
        if missing:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
        raise


@contextlib.contextmanager
def output_lock(folder: Path, name: str, what: str) -> Iterator[None]:
    """Hold `folder/.<name>.srcr-lock` for the block; refuse at once if another live run holds it."""
    path = Path(folder) / f".{name}{LOCK_SUFFIX}"
    while True:
        handle = path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise SrcrError(
                f"{what} is being written by another srcr run ({holder}); "
                "wait for it to finish or pass another --name/--out"
            ) from None
        # The previous holder may have unlinked the file between our open and our lock: retry on the new one.
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        handle.close()


def check_writable(path: Path, overwrite: bool) -> None:
    """Fail before any expensive work if `path` exists and may not be replaced."""
    path = Path(path)
    if path.is_dir():
        raise SrcrError(f"{path} is a folder; choose another --name or --out")
    if path.exists() and not overwrite:
        raise SrcrError(f"{path} already exists; pass --overwrite to replace it or choose another --out/--name")


def destination_error(error: OSError, final: Path) -> SrcrError | None:
    """The one-line error for an OSError that says the destination cannot take the file, else None."""
    reason = _DESTINATION_ERRORS.get(error.errno)
    if reason is None and error.errno in (errno.EROFS, errno.EACCES):
        reason = error.strerror
    if reason is None:
        return None
    return SrcrError(f"cannot write {final.name} in {final.parent}: {reason}; free space or choose another --out")


@contextlib.contextmanager
def atomic_path(final: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path beside `final`; move it onto `final` only if the block succeeds."""
    final = Path(final)
    check_writable(final, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / temp_name(final.name)
    try:
        tmp.touch(exist_ok=False)
        yield tmp
        publish(tmp, final, overwrite)
    except OSError as error:
        translated = destination_error(error, final)
        if translated is None:
            raise
        raise translated from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def publish(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename `tmp` onto `final`; without `overwrite`, never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # fails if `final` exists: no check-then-rename race
    except FileExistsError:
        raise SrcrError(
            f"{final} appeared while srcr was writing it; pass --overwrite or choose another --name"
        ) from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        check_writable(final, overwrite=False)  # a file system without hard links
        os.replace(tmp, final)
    else:
        tmp.unlink()


@contextlib.contextmanager
def temporary_folder(parent: Path, label: str) -> Iterator[Path]:
    """A scratch folder in `parent` (same file system as the output), removed however the block ends."""
    path = Path(parent) / temp_name(label)
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_json(final: Path, data: Any, overwrite: bool = False) -> None:
    with atomic_path(final, overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()
