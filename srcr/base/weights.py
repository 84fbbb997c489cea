"""Model weights one tensor at a time: from a model in memory, or from the safetensors files of a folder.

Writers (the GGUF converter, the pruned-folder writer) ask a `TensorSource` for each tensor when they
write it, so a model on disk is never read whole. A sharded folder is read shard by shard: its
`model.safetensors.index.json` (or, without one, each file's header) says which file holds a name,
and only that file is opened.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from srcr.base.errors import SrcrError
from srcr.base.files import temp_name

if TYPE_CHECKING:
    import torch
    from torch import nn

INDEX_FILE = "model.safetensors.index.json"
MAX_INDEX_BYTES = 64 << 20  # an index lists names: megabytes even for a 400B model


class TensorSource(Protocol):
    """Named tensors, each read when asked for (on the CPU, in its stored dtype)."""

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


class ModuleTensors:
    """The tensors of a model in memory (its state dict: references, no copies)."""

    def __init__(self, module: nn.Module) -> None:
        self._state = module.state_dict()

    def names(self) -> list[str]:
        return list(self._state)

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].detach().cpu()


class SafetensorsFolder:
    """Which safetensors file of a folder holds each tensor; tensors are read from it one by one."""

    def __init__(self, folder: Path, files: Iterable[Path] | None = None) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        files = files or self.folder.glob("*.safetensors")
        self.location = _read_index(index) if index.is_file() else _read_headers(files)
        if not self.location:
            raise SrcrError(f"{self.folder} holds no safetensors weights; pass a complete model folder")

    def names(self) -> list[str]:
        return list(self.location)

    def files(self) -> list[Path]:
        return sorted(set(self.location.values()))

    def get(self, name: str) -> torch.Tensor:
        return next(iter(self.read([name])))[1]

    def read(self, names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) for each of `names`, opening each file once, in the order of the files."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.location:
                raise SrcrError(f"{self.folder} has no weight {name!r}; the model folder is incomplete or damaged")
            by_file.setdefault(self.location[name], []).append(name)
        for file, members in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in members:
                        yield name, handle.get_tensor(name)
            except SrcrError:
                raise
            except Exception as error:  # SafetensorError, OSError: the file does not hold what its index says
                raise SrcrError(f"{file} cannot be read ({error}); re-download or re-save the model") from None


def _read_index(index: Path) -> dict[str, Path]:
    """The weight map of an index file, every name checked: it is untrusted input like any file we read."""
    if index.stat().st_size > MAX_INDEX_BYTES:
        raise SrcrError(f"{index} is too large to be a weight index; repair or re-download the model")
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError):
        weight_map = None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SrcrError(f"{index} has no weight_map; repair or re-download the model")
    location: dict[str, Path] = {}
    for name, file_name in weight_map.items():
        plain = isinstance(file_name, str) and file_name.endswith(".safetensors") and Path(file_name).name == file_name
        if not isinstance(name, str) or not plain or file_name.startswith("."):
            raise SrcrError(f"{index} maps {name!r} to {file_name!r}, not a safetensors file of the folder; repair it")
        file = index.parent / file_name
        if not file.is_file():
            raise SrcrError(f"{index} names {file_name}, which is missing; re-download the model")
        location[name] = file
    return location


def _read_headers(files: Iterable[Path]) -> dict[str, Path]:
    from safetensors import safe_open

    location: dict[str, Path] = {}
    for file in sorted(files):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                    location.setdefault(name, file)
        except Exception as error:
            raise SrcrError(f"{file} is damaged or truncated ({error}); re-download or re-save the model") from None
    return location


class FolderWriter:
    """Writes a safetensors model folder a few tensors at a time (one file per call) and its index last.

    Each file is written under a temporary name and renamed, so an interrupted run leaves only whole
    files; the index, written by `finish`, is what makes the folder a model.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def write(self, file_name: str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        if not tensors:
            return
        staging = self.folder / temp_name(file_name)
        save_file({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}, str(staging))
        os.replace(staging, self.folder / file_name)
        for name, tensor in tensors.items():
            self.weight_map[name] = file_name
            self.total_bytes += tensor.numel() * tensor.element_size()

    def finish(self) -> Path:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        staging = self.folder / temp_name(INDEX_FILE)
        staging.write_text(json.dumps(index, indent=2))
        os.replace(staging, self.folder / INDEX_FILE)
        return self.folder / INDEX_FILE
