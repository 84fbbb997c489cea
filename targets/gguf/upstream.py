"""llama.cpp's own Hugging Face -> GGUF converter (`convert_hf_to_gguf.py`), at the installed llama.cpp's version.

srcr's hand-written writer (convert.py) covers llama, mistral and qwen2, and what only it can write
(per-layer widths, GPTQ codes). Every other family llama.cpp supports is converted by llama.cpp's own
script, which carries each family's quirks (norm offsets, embedding scales, q/k norms, fused
projections, sliding-window layouts, pre-tokenizer detection) and is kept current upstream.

The script and its `conversion/` package come from the source distribution of the installed
llama-cpp-python (its `vendor/llama.cpp`), so the converter and the runtime are one llama.cpp version.
`python -m srcr.targets.gguf.upstream` puts them under the environment's `share/srcr/` (scripts/setup.sh
does); SRCR_LLAMA_CPP_CONVERTER may name a llama.cpp checkout instead. The script runs in a child
interpreter with its own gguf-py first on the path, on a safetensors folder of the (pruned) model.
"""

from __future__ import annotations

import ast
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from srcr.base.errors import SrcrError
from srcr.base.files import temp_name, temporary_folder

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CONVERTER_ENV = "SRCR_LLAMA_CPP_CONVERTER"
SCRIPT = "convert_hf_to_gguf.py"
VERSION_FILE = "LLAMA_CPP_PYTHON_VERSION"
INSTALL_COMMAND = "python -m srcr.targets.gguf.upstream"
# What the converter needs from the sdist's vendor/llama.cpp (its licence travels with it).
_MEMBERS = (SCRIPT, "conversion/", "gguf-py/", "LICENSE")
_SDIST_ROOT = "vendor/llama.cpp/"
# Files of a model folder that are weights or srcr's own; everything else small (tokenizer files, chat
# templates, generation config) is copied beside the converted weights for the converter to read.
_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt", ".onnx"}
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", "srcr_hints.json"}
_MAX_SIDE_FILE = 256 << 20


@dataclass(frozen=True)
class Converter:
    folder: Path  # holds convert_hf_to_gguf.py and conversion/
    version: str | None  # the llama-cpp-python it came from; None for a user's llama.cpp checkout

    @property
    def script(self) -> Path:
        return self.folder / SCRIPT

    def label(self) -> str:
        return f"llama.cpp convert_hf_to_gguf.py (llama-cpp-python {self.version or 'unknown: ' + str(self.folder)})"


def default_folder() -> Path:
    return Path(sys.prefix) / "share" / "srcr" / "llama.cpp-converter"


def installed_llama_cpp_version() -> str:
    import llama_cpp

    return str(llama_cpp.__version__)


def locate_converter() -> Converter:
    """The converter to run, or a SrcrError that says how to install it."""
    override = os.environ.get(CONVERTER_ENV)
    if override:
        folder = Path(override)
        if not (folder / SCRIPT).is_file():
            raise SrcrError(f"{CONVERTER_ENV}={override} holds no {SCRIPT}; point it at a llama.cpp checkout")
        return Converter(folder, _read_version(folder))
    folder = default_folder()
    if not (folder / SCRIPT).is_file():
        raise SrcrError(
            f"llama.cpp's converter is not installed (it converts every family but llama, mistral and qwen2); "
            f"run `{INSTALL_COMMAND}` or scripts/setup.sh"
        )
    version, wanted = _read_version(folder), installed_llama_cpp_version()
    if version != wanted:
        raise SrcrError(
            f"llama.cpp's converter is from llama-cpp-python {version}, the runtime is {wanted}; "
            f"run `{INSTALL_COMMAND}` again"
        )
    return Converter(folder, version)


def _read_version(folder: Path) -> str | None:
    marker = folder / VERSION_FILE
    return marker.read_text().strip() if marker.is_file() else None


def architectures(converter: Converter) -> frozenset[str]:
    """The Hugging Face `architectures` names the converter registers for text models (not projectors)."""
    sources = [converter.script, *sorted((converter.folder / "conversion").glob("*.py"))]
    names: set[str] = set()
    for source in sources:
        tree = ast.parse(source.read_text(encoding="utf-8"), filename=str(source))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and not _is_projector(node):
                names.update(_registered_names(node.decorator_list))
    return frozenset(names)


def _registered_names(decorators: Iterable[ast.expr]) -> set[str]:
    names = set()
    for decorator in decorators:
        if (
            isinstance(decorator, ast.Call)
            and isinstance(decorator.func, ast.Attribute)
            and decorator.func.attr == "register"
            and isinstance(decorator.func.value, ast.Name)
            and decorator.func.value.id == "ModelBase"
        ):
            strings = (arg.value for arg in decorator.args if isinstance(arg, ast.Constant))
            names.update(value for value in strings if isinstance(value, str))
    return names


def _is_projector(node: ast.ClassDef) -> bool:
    # Vision/audio projector classes register the same HF names as their text model.
    for statement in node.body:
        if isinstance(statement, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "model_arch" for target in statement.targets
        ):
            return ast.unparse(statement.value).endswith("MMPROJ")
    return False


def check_supported(converter: Converter, architecture: str, model_type: str) -> None:
    known = architectures(converter)
    if architecture not in known:
        raise SrcrError(
            f"llama.cpp (llama-cpp-python {converter.version or '?'}) cannot convert {architecture} "
            f"(model_type {model_type!r}), so neither can srcr's GGUF target; use --format onnx"
        )


def check_vocab(converter: Converter, source_folder: Path, model_name: str | None = None) -> None:
    """Convert only the vocabulary of the model in `source_folder` (its config and tokenizer files, no weights)
    and load it in llama.cpp: a tokenizer the converter or llama.cpp refuses fails in seconds, before
    calibration, not after it."""
    from srcr.targets.gguf.llama_log import check_vocab_loads

    with tempfile.TemporaryDirectory(prefix="srcr-vocab-") as scratch:
        folder = Path(scratch) / "model"
        folder.mkdir()
        shutil.copyfile(Path(source_folder) / "config.json", folder / "config.json")
        _copy_side_files(Path(source_folder), folder)
        out = Path(scratch) / "vocab.gguf"
        try:
            run_converter(converter, folder, out, "f32", model_name, vocab_only=True)
        except ConverterFailed as error:
            raise SrcrError(
                f"llama.cpp's converter cannot convert the tokenizer of {source_folder} ({error.reason}); "
                "nothing was calibrated: add the tokenizer file it names, or use --format onnx"
            ) from None
        reason = check_vocab_loads(str(out))
    if reason is not None:
        raise SrcrError(
            f"llama.cpp cannot load the tokenizer of {source_folder} as converted ({reason}); nothing was "
            "calibrated; use --format onnx"
        )


def prepare_tokenizer(folder: Path) -> None:
    """Name a Phi-3-architecture model's BPE tokenizer as GPT-2's, in srcr's own copy of the folder.

    llama.cpp's Phi-3 converter reads the vocabulary as SentencePiece (`tokenizer.model`) unless
    `tokenizer_config.json` names the GPT-2 tokenizer class, as Phi-4 ships it. A Phi-3-architecture model
    saved by a recent transformers names its class otherwise (e.g. "TokenizersBackend") and carries only
    `tokenizer.json`; its BPE vocabulary is what the GPT-2 path reads, so it is named so here."""
    config = _small_json(folder / "config.json")
    if "Phi3ForCausalLM" not in (config.get("architectures") or []) or (folder / "tokenizer.model").exists():
        return
    settings_file = folder / "tokenizer_config.json"
    settings = _small_json(settings_file)
    if not settings or settings.get("tokenizer_class") == "GPT2Tokenizer":
        return
    model = _small_json(folder / "tokenizer.json").get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        return
    settings["tokenizer_class"] = "GPT2Tokenizer"
    settings_file.write_text(json.dumps(settings, indent=2), encoding="utf-8")


def _small_json(path: Path) -> dict:
    """A side file's JSON object; {} when it is absent, too large, or not a JSON object (the converter then
    says what it misses)."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_SIDE_FILE:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _copy_side_files(source_folder: Path, folder: Path) -> None:
    for path in sorted(source_folder.iterdir()):
        if path.name in _NOT_COPIED or path.suffix in _WEIGHT_SUFFIXES or not path.is_file():
            continue
        if path.stat().st_size > _MAX_SIDE_FILE:
            continue
        shutil.copyfile(path, folder / path.name)


def write_model_folder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, source_folder: Path | None, folder: Path
) -> None:
    """The model as a safetensors folder the converter reads: its weights and config as they are now
    (pruned), the source folder's tokenizer files as they were (the converter needs e.g. tokenizer.model,
    which a loaded fast tokenizer does not write back)."""
    model.save_pretrained(folder, safe_serialization=True)
    if source_folder is None or not Path(source_folder).is_dir():
        tokenizer.save_pretrained(folder)
        return
    _copy_side_files(Path(source_folder), folder)


def run_converter(
    converter: Converter, folder: Path, out: Path, outtype: str, model_name: str | None, vocab_only: bool = False
) -> None:
    """convert_hf_to_gguf.py on `folder` (a folder of srcr's own), writing `out` (f32 or f16; the vocabulary
    alone with `vocab_only`); its last error line on failure."""
    prepare_tokenizer(folder)
    command = [sys.executable, str(converter.script), str(folder), "--outfile", str(out), "--outtype", outtype]
    if vocab_only:
        command.append("--vocab-only")
    if model_name:
        # llama.cpp keys some per-family tokenizer fixes on general.name; the temporary folder's name is noise.
        command += ["--model-name", model_name]
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    env["PYTHONPATH"] = os.pathsep.join([str(converter.folder / "gguf-py"), str(converter.folder)])
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0 or not Path(out).is_file():
        lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise ConverterFailed(lines[-1] if lines else f"exit status {result.returncode}")


class ConverterFailed(SrcrError):
    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"llama.cpp's converter failed ({reason}); see docs/gguf.md for the families it takes")


def gguf_tensor_names(arch_name: str, blocks: int, hf_names: Iterable[str]) -> dict[str, str]:
    """{HF weight name: GGUF tensor name} by gguf-py's tables, for the names that map."""
    import gguf

    arch = next((arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == arch_name), None)
    if arch is None:
        return {}
    table = gguf.get_tensor_name_map(arch, blocks)
    mapped = {}
    for name in hf_names:
        found = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if found is not None:
            mapped[name] = found
    return mapped


def convert_with_llama_cpp(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    file_type: str,
    hints: Mapping[str, object] | None = None,
    folder: Path | None = None,
) -> tuple[dict[str, str], str]:
    """Write `model` to `out` (F32, F16 or BF16) with llama.cpp's converter; return ({HF weight name: GGUF
    tensor name} for the linear weights that kept their input width, the converter's label). With
    `folder`, the model is already saved there (a streamed model's pruned folder; `model` is a skeleton)."""
    import gguf
    import torch

    hints = hints or {}
    converter = locate_converter()
    source = hints.get("source_folder")
    model_name = hints.get("model_name")
    name = str(model_name) if model_name else None
    if folder is not None:
        run_converter(converter, folder, Path(out), file_type.lower(), name)
    else:
        with temporary_folder(Path(out).parent, "hf-model") as saved:
            write_model_folder(model, tokenizer, Path(str(source)) if source else None, saved)
            run_converter(converter, saved, Path(out), file_type.lower(), name)
    reader = gguf.GGUFReader(out)
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    columns = {tensor.name: int(tensor.shape[0]) for tensor in reader.tensors if len(tensor.shape) == 2}
    linears = {
        f"{name}.weight": module.in_features
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    blocks = len(model.model.layers) if hasattr(getattr(model, "model", None), "layers") else 0
    mapped = gguf_tensor_names(arch_name, blocks, linears)
    # Only where one HF matrix is one GGUF tensor with the same inputs can its importance carry over.
    names = {hf: name for hf, name in mapped.items() if columns.get(name) == linears[hf]}
    return names, converter.label()


def install(sdist: Path | None = None, folder: Path | None = None) -> Path:
    """Unpack the converter from llama-cpp-python's source distribution (downloaded with pip when not given)."""
    folder = folder or default_folder()
    version = installed_llama_cpp_version()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        if sdist is None:
            sdist = _download_sdist(version, Path(scratch))
        staging = folder.parent / temp_name(folder.name)
        staging.mkdir()
        try:
            _extract(Path(sdist), staging)
            (staging / VERSION_FILE).write_text(version + "\n")
            shutil.rmtree(folder, ignore_errors=True)
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def _download_sdist(version: str, into: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--dest", str(into), f"llama-cpp-python=={version}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise SrcrError(
            f"pip could not download llama-cpp-python {version}'s source distribution; pass its .tar.gz "
            f"with `{INSTALL_COMMAND} --sdist FILE`"
        )
    return found[0]


def _extract(sdist: Path, staging: Path) -> None:
    if not hasattr(tarfile, "data_filter"):
        raise SrcrError("unpacking the converter safely needs Python 3.10.12, 3.11.4 or newer; upgrade Python")
    with tarfile.open(sdist, "r:gz") as archive:
        top = archive.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/{_SDIST_ROOT}"
        members = []
        for member in archive.getmembers():
            if not member.name.startswith(prefix) or not (member.isfile() or member.isdir()):
                continue
            relative = posixpath.normpath(member.name[len(prefix) :])
            if relative.startswith(("..", "/")):
                continue  # a name that climbs out of the folder; the data filter would refuse it too
            if any(relative == want or relative.startswith(want) for want in _MEMBERS):
                member.name = relative
                members.append(member)
        if not any(member.name == SCRIPT for member in members):
            raise SrcrError(f"{sdist.name} carries no {_SDIST_ROOT}{SCRIPT}; is it llama-cpp-python's sdist?")
        archive.extractall(staging, members=members, filter="data")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog=INSTALL_COMMAND, description="Install llama.cpp's HF->GGUF converter for srcr's GGUF target."
    )
    parser.add_argument("--sdist", type=Path, help="llama-cpp-python's .tar.gz (default: download it with pip)")
    args = parser.parse_args(argv)
    try:
        folder = install(args.sdist)
    except SrcrError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"llama.cpp's converter (llama-cpp-python {installed_llama_cpp_version()}) is in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
