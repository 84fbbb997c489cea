"""Property tests on the files srcr reads back: manifests and reference packs are untrusted input.

Every case starts from the files a real (tiny) export wrote and breaks them: keys deleted at any
depth, values of the wrong type, huge numbers, NaN/Infinity tokens, odd unicode, file names that
leave the folder, arrays of the wrong dtype/shape/values, damaged JSON headers, truncated and
flipped bytes, absurd declared sizes. Reading any of them must either succeed or end in one
SrcrError (a one-line message for the user): any other exception is a bug, a traceback for the user.
Hypothesis runs derandomized, so CI tests the same cases every time.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import resource
import shutil
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tomllib
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from rich.console import Console
from typer.testing import CliRunner

from srcr.base.errors import SrcrError
from srcr.evaluators.reference import ReferencePack, evaluate
from srcr.exporter.cli import app
from srcr.exporter.compare import COLUMN_KEYS, read_unique, render_table, rows_for, to_csv
from srcr.exporter.manifest import parse_manifest, read_manifest
from srcr.exporter.verify import verify

PROMPTS = str(Path(__file__).parent / "data" / "prompts_small.jsonl")
TASKS = [
    {"context": "The Prime Minister said the", "choices": ["government", "banana"], "answer": 0},
    {"context": "Police said the man was", "choices": ["arrested", "purple", "violin"], "answer": 1},
]


def fuzz_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        derandomize=True,  # the same cases on every run
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


def check_user_error(error: SrcrError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    assert "allow_pickle" not in message, message


# ---------------------------------------------------------------------------------------------
# One real export: the valid manifest, artifact and reference pack every case starts from.


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    work = tmp_path_factory.mktemp("fuzz-export")
    tasks = work / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(task) + "\n" for task in TASKS))
    out = work / "out"
    args = [
        "export", "--model", str(tiny_llama_dir), "--method", "magnitude", "--sparsity", "0.5", "--bits", "8",
        "--calib-samples", "4", "--seq-len", "64", "--eval-windows", "1", "--last-word-items", "4",
        "--new-tokens", "4", "--top-k", "8", "--no-builtin-prompts", "--prompts", PROMPTS,
        "--tasks", str(tasks), "--out", str(out), "--name", "tiny", "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def base_manifest(export_dir) -> dict[str, Any]:
    return json.loads((export_dir / "tiny.manifest.json").read_text())


@pytest.fixture(scope="module")
def base_arrays(export_dir) -> dict[str, np.ndarray]:
    with np.load(export_dir / "tiny.reference.npz", allow_pickle=False) as stored:
        return {key: stored[key] for key in stored.files}


@pytest.fixture(scope="module")
def runtime(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srcr.targets.torch_runtime import TorchRuntime

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype="float32")
    return TorchRuntime(model, AutoTokenizer.from_pretrained(tiny_llama_dir))


@pytest.fixture(scope="module")
def embedder():
    from srcr.evaluators.embedder import load_embedder

    return load_embedder()


# ---------------------------------------------------------------------------------------------
# Manifests


RTL_AND_CONTROL = "\u202e\u200f\u0627\u05d0\x00\x07\x1b\n\r\t\u2028\ufeff[]/\\"
PATHS = ["../../etc/passwd", "/etc/hostname", "a/b", "", ".", "..", "link.gguf", "tiny.manifest.json", "x\0y"]
SPECIAL_VALUES: list[Any] = [
    *PATHS,
    1e308, -1e308, 2**70, -(2**70), 10**400, 0, -1, 1, 2, 0.5, math.nan, math.inf, -math.inf, True, False, None,
    [], {}, [1], {"": None},
    "x" * 300, "\u00e9" * 200, "\ud800", "\u202eevil", "\x1b[31mred", "[/]", "[bold]x", "a\nb", "onnx", " GGUF ",
    "0" * 64, "f" * 64,
]  # fmt: skip
# Fields srcr acts on (file names, digests, the format, the version) get extra attention.
FOCUS = [
    ("schema_version",), ("format",), ("name",), ("artifact", "file"), ("artifact", "sha256"), ("artifact",),
    ("evaluation",), ("evaluation", "reference_pack", "file"), ("evaluation", "reference_pack", "sha256"),
    ("evaluation", "reference_pack"), ("evaluation", "settings"), ("pruning", "sparsity"), ("compression", "tcr"),
    ("srcr",), ("sr",), ("evaluation", "last_word"), ("quantization", "type"),
]  # fmt: skip

texts = st.one_of(st.text(max_size=20), st.text(alphabet=st.sampled_from(RTL_AND_CONTROL), max_size=8))
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),  # NaN and infinities become NaN/Infinity tokens in the JSON text
    texts,
    st.sampled_from(SPECIAL_VALUES),
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=6,
)


def key_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key (dict) or index (list) path inside a JSON value, at any depth."""
    paths = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        paths.append((*prefix, key))
        paths.extend(key_paths(item, (*prefix, key)))
    return paths


def lookup(data: Any, path: tuple) -> Any:
    for key in path:
        data = data[key]
    return data


@st.composite
def mutated_manifests(draw, base: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = key_paths(data)
        if not paths:
            break
        present = [path for path in FOCUS if path in set(paths)]
        path = draw(st.sampled_from(present) if present and draw(st.booleans()) else st.sampled_from(paths))
        parent, key = lookup(data, path[:-1]), path[-1]
        op = draw(st.sampled_from(["delete", "value", "special", "add"]))
        if op == "delete":
            del parent[key]
        elif op == "value":
            parent[key] = draw(json_values)
        elif op == "special":
            parent[key] = draw(st.sampled_from(SPECIAL_VALUES))
        elif isinstance(parent, dict):
            parent[draw(texts)] = draw(json_values)
        else:
            parent.append(draw(json_values))
    return data


def number_spans(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in re.finditer(r"(?<=[:\[ ])-?\d+(\.\d+)?([eE][-+]?\d+)?", text)]


@st.composite
def manifest_texts(draw, base: dict[str, Any]) -> str:
    """A mutated manifest as JSON text, sometimes damaged as text too."""
    data = draw(mutated_manifests(base)) if draw(st.integers(0, 4)) else copy.deepcopy(base)
    text = json.dumps(data, indent=draw(st.sampled_from([None, 2])), ensure_ascii=draw(st.booleans()))
    op = draw(st.sampled_from(["none", "none", "number", "truncate", "nesting", "digits", "bom", "garbage"]))
    if op == "number" and number_spans(text):
        start, end = draw(st.sampled_from(number_spans(text)))
        token = draw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "2e-400"]))
        text = text[:start] + token + text[end:]
    elif op == "truncate":
        text = text[: draw(st.integers(0, len(text)))]
    elif op == "nesting":
        depth = draw(st.sampled_from([50, 5000, 200_000]))
        text = text.rstrip()[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"
    elif op == "digits":
        text = text.replace('"schema_version": 2', '"schema_version": ' + "9" * draw(st.sampled_from([30, 5000])))
    elif op == "bom":
        text = "\ufeff" + text
    elif op == "garbage":
        text += draw(texts)
    return text


def write_text(path: Path, text: str) -> None:
    # A lone surrogate cannot be UTF-8: written as-is it makes a file that is not UTF-8 text.
    path.write_bytes(text.encode("utf-8", errors="surrogatepass"))


def compare_all(paths: list[Path], sort: str | None) -> None:
    """What `srcr compare` does with these files, every output format rendered."""
    typed, notes = read_unique(paths)
    rows = rows_for(typed, sort)
    Console(file=io.StringIO(), width=300).print(render_table(rows))
    to_csv(rows)
    json.dumps(rows)
    for note in notes:
        assert "\n" not in note


def test_manifest_mutations_read_and_compare(base_manifest, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-manifests")
    valid = folder / "valid.manifest.json"
    valid.write_text(json.dumps(base_manifest))
    parse_manifest(valid.read_text(), "valid")  # the starting point validates

    ran = []

    @fuzz_settings(1200)
    @given(manifest_texts(base_manifest), st.sampled_from([None, *COLUMN_KEYS, "nope"]))
    def case(text: str, sort: str | None) -> None:
        ran.append(1)
        path = folder / "case.manifest.json"
        write_text(path, text)
        try:
            parse_manifest(text, "case")
        except SrcrError as error:
            check_user_error(error)
        try:
            read_manifest(path)
            compare_all([path, folder / "." / path.name, valid], sort)
        except SrcrError as error:
            check_user_error(error)

    case()
    assert len(ran) >= 1000


def test_recipe_mutations_read_as_a_recipe_or_one_line(base_manifest, tmp_path_factory):
    """Recipe files (the manifest's resolved recipe, mutated) as JSON, YAML and TOML; and as `--recipe`."""
    import yaml

    from srcr.exporter.recipe import Recipe, read_recipe

    folder = tmp_path_factory.mktemp("fuzz-recipes")
    base = base_manifest["recipe"]
    Recipe.model_validate(base)  # the starting point validates
    ran = []

    @fuzz_settings(400)
    @given(mutated_manifests(base), st.sampled_from(["json", "yaml", "toml"]))
    def case(data: dict[str, Any], suffix: str) -> None:
        ran.append(1)
        path = folder / f"case.{suffix}"
        if suffix == "json":
            text = json.dumps(data)
        elif suffix == "yaml":
            text = yaml.safe_dump(data, allow_unicode=True)
        else:
            try:
                text = Recipe.model_validate(data).to_toml()
            except Exception:  # not a recipe: no TOML to write, but still a file to read
                text = json.dumps(data).replace("{", "[", 1)
        write_text(path, text)
        try:
            recipe = read_recipe(path)
        except SrcrError as error:
            check_user_error(error)
            return
        assert Recipe.model_validate(tomllib.loads(recipe.to_toml())) == recipe

    case()
    assert len(ran) >= 300


def test_manifest_file_names_and_non_utf8(base_manifest, tmp_path_factory):
    """Every path-like value in both file fields, and bytes that are not text."""
    folder = tmp_path_factory.mktemp("fuzz-names")
    for field in (("artifact", "file"), ("evaluation", "reference_pack", "file"), ("name",)):
        for value in [*PATHS, *SPECIAL_VALUES]:
            data = copy.deepcopy(base_manifest)
            lookup(data, field[:-1])[field[-1]] = value
            path = folder / "m.json"
            write_text(path, json.dumps(data))
            try:
                compare_all([path], "name")
            except SrcrError as error:
                check_user_error(error)
    for raw in (b"\xff\xfe{}", b"\x00" * 10, json.dumps(base_manifest).encode("utf-16"), b""):
        (folder / "bytes.json").write_bytes(raw)
        with pytest.raises(SrcrError) as caught:
            read_manifest(folder / "bytes.json")
        check_user_error(caught.value)


@pytest.fixture(scope="module")
def verify_folder(export_dir, tmp_path_factory) -> Path:
    """The artifact and pack beside each mutated manifest, a copy one folder up and a link out."""
    root = tmp_path_factory.mktemp("fuzz-verify")
    folder = root / "a" / "b"
    folder.mkdir(parents=True)
    for name in ("tiny.gguf", "tiny.reference.npz"):
        shutil.copy(export_dir / name, folder / name)
        shutil.copy(export_dir / name, root / "a" / name)
    (folder / "link.gguf").symlink_to(root / "a" / "tiny.gguf")
    (folder / "sub").mkdir()
    return folder


# Recorded figures that still validate, however odd: verify then runs to the end and compares them.
VALID_FIGURES = {
    ("evaluation", "perplexity", "compressed"): st.floats(min_value=1e-300, max_value=1e308),
    ("evaluation", "kld", "mean"): st.floats(min_value=0.0, max_value=1e308),
    ("evaluation", "sr"): st.floats(min_value=0.0, max_value=1.0),
    ("evaluation", "semantic", "mean"): st.floats(min_value=-1.001, max_value=1.001),
    ("evaluation", "last_word"): st.none(),
    ("evaluation", "multiple_choice"): st.none(),
    ("evaluation", "settings"): st.dictionaries(texts, json_values, max_size=3),
    ("evaluation", "runtime"): st.dictionaries(texts, json_values, max_size=3),
}


@st.composite
def verify_manifests(draw, base: dict[str, Any]) -> dict[str, Any]:
    """Mostly the fields verify acts on (so most cases fail fast); a valid one runs the evaluators."""
    kind = draw(st.integers(0, 7))
    if kind == 0:
        return draw(mutated_manifests(base))
    data = copy.deepcopy(base)
    if kind == 1:
        path = draw(st.sampled_from(sorted(VALID_FIGURES)))
        value = draw(VALID_FIGURES[path])
    else:
        path = draw(st.sampled_from(FOCUS))
        value = draw(st.sampled_from(SPECIAL_VALUES + ["sub", "tiny.gguf", "tiny.reference.npz"]) | json_values)
    lookup(data, path[:-1])[path[-1]] = value
    return data


def verify_or_refuse(manifest: Path, data: dict[str, Any]) -> bool:
    write_text(manifest, json.dumps(data))
    try:
        verify(manifest, device="cpu")
    except SrcrError as error:
        check_user_error(error)
        return False
    return True


def test_verify_mutated_manifests(base_manifest, verify_folder):
    manifest = verify_folder / "tiny.manifest.json"
    ran, verified = [], []

    @fuzz_settings(50)
    @given(verify_manifests(base_manifest))
    def case(data: dict[str, Any]) -> None:
        ran.append(1)
        if verify_or_refuse(manifest, data):
            verified.append(1)

    case()
    assert len(ran) >= 45 and verified  # some mutations leave what verify needs intact: it runs to the end


def test_verify_file_names_and_formats(base_manifest, verify_folder):
    """Every path-like and odd value in the fields verify opens files or runtimes by."""
    manifest = verify_folder / "tiny.manifest.json"
    fields = [("artifact", "file"), ("evaluation", "reference_pack", "file"), ("format",)]
    for field in fields:
        for value in [*SPECIAL_VALUES, "sub", "tiny.reference.npz", "../tiny.gguf", "tiny.gguf\u202e"]:
            data = copy.deepcopy(base_manifest)
            lookup(data, field[:-1])[field[-1]] = value
            verify_or_refuse(manifest, data)


# ---------------------------------------------------------------------------------------------
# Reference packs


def header_of(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    return json.loads(str(arrays["header"]))


def current_header(arrays: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> dict[str, Any]:
    """The (possibly already mutated) header if it still has settings to change, else the original."""
    try:
        header = header_of(arrays)
    except (KeyError, ValueError, RecursionError):
        return header_of(base)
    return header if isinstance(header, dict) and isinstance(header.get("settings"), dict) else header_of(base)


def with_header(arrays: dict[str, np.ndarray], header: Any, **dump: Any) -> None:
    arrays["header"] = np.array(json.dumps(header, **dump))


DTYPES = [
    np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
    np.float16, np.float32, np.float64, np.bool_, np.complex64, "U5", "S5", "M8[s]",
]  # fmt: skip
BAD_IDS = [-1, -(2**31), 2**31 - 1, 2**31, 49151, 49152, 49153, 2**62]
BAD_FLOATS = [math.nan, math.inf, -math.inf, 1e30, -1e30, 0.5, -0.0, 3e38, -3e38]


def random_arrays():
    shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6)
    return st.sampled_from(DTYPES).flatmap(lambda dtype: hnp.arrays(np.dtype(dtype), shapes))


@st.composite
def mutated_arrays(draw, base: dict[str, np.ndarray], cheap: bool = False) -> dict[str, np.ndarray]:
    """The pack's arrays with one to three things wrong (or, `cheap`, only values that keep evaluation quick)."""
    arrays = dict(base)
    ops = ["values", "ids", "floats", "settings"] if cheap else [
        "random", "values", "ids", "floats", "shape", "ndim", "drop", "offsets", "header", "settings", "add",
    ]  # fmt: skip
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(arrays)))
        value = arrays[key]
        op = draw(st.sampled_from(ops))
        if op == "random":
            arrays[key] = draw(random_arrays())
        elif op == "values" and value.size:
            flat = value.copy().reshape(-1)
            index = draw(st.integers(0, flat.size - 1))
            if value.dtype.kind in "iu":
                flat[index] = draw(st.integers(0, 20) if cheap else st.integers(-5, 10**6))
            elif value.dtype.kind == "f":
                flat[index] = draw(st.floats(-100, 0, width=32))
            elif value.dtype.kind == "b":
                flat[index] = not flat[index]
            elif value.dtype.kind == "U" and value.ndim:
                flat[index] = draw(texts)
            arrays[key] = flat.reshape(value.shape)
        elif op == "ids" and value.dtype.kind in "iu" and value.size:
            flat = value.astype(np.int64).reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(BAD_IDS))
            if cheap:
                flat = np.minimum(np.maximum(flat, 0), 2**31 - 1)  # out-of-vocabulary, never absurd
            arrays[key] = flat.reshape(value.shape).astype(draw(st.sampled_from([np.int64, np.uint64, value.dtype])))
        elif op == "floats" and value.dtype.kind == "f" and value.size:
            flat = value.copy().reshape(-1)
            flat[draw(st.integers(0, flat.size - 1))] = draw(st.sampled_from(BAD_FLOATS))
            arrays[key] = flat.reshape(value.shape)
        elif op == "shape" and value.ndim:
            cut = draw(st.integers(0, value.shape[0]))
            arrays[key] = np.concatenate([value[:cut], value[:cut]]) if draw(st.booleans()) else value[:cut]
        elif op == "ndim":
            # 0-d arrays, never numpy scalars: a later mutation of the same key indexes it again.
            if draw(st.booleans()) or value.ndim == 0:
                arrays[key] = np.asarray(value)[None]
            else:
                arrays[key] = np.asarray(value.reshape(-1)[0]) if value.size else np.zeros((), value.dtype)
        elif op == "drop":
            del arrays[key]
        elif op == "offsets":
            offsets = [name for name in arrays if name.endswith("offsets")]
            if offsets:
                name = draw(st.sampled_from(offsets))
                flat = arrays[name].astype(np.int64).reshape(-1)
                if flat.size:
                    flat[draw(st.integers(0, flat.size - 1))] = draw(st.integers(-3, 400))
                arrays[name] = flat
        elif op == "header":
            kind = draw(st.sampled_from(["json", "text", "format", "bytes", "ndim", "digits", "nesting"]))
            if kind == "json":
                arrays["header"] = np.array(json.dumps(draw(json_values)))
            elif kind == "text":
                arrays["header"] = np.array(str(arrays["header"])[: draw(st.integers(0, 40))] + draw(texts))
            elif kind == "format":
                with_header(arrays, {**header_of(base), "format": draw(json_values)})
            elif kind == "bytes":
                arrays["header"] = np.array(str(base["header"]).encode())
            elif kind == "ndim":
                arrays["header"] = np.array([str(base["header"])])
            elif kind == "digits":
                arrays["header"] = np.array(str(base["header"]).replace('"seed": 0', '"seed": ' + "7" * 5000))
            else:
                arrays["header"] = np.array('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")
        elif op == "settings":
            header = current_header(arrays, base)
            field = draw(st.sampled_from([*sorted(header["settings"]), "settings", "extra"]))
            value = draw(st.integers(-2, 8) | st.booleans()) if cheap else draw(json_values)
            if field == "settings":
                header["settings"] = value
            else:
                header["settings"][field] = value
            if cheap and field == "max_new_tokens":
                header["settings"][field] = 4
            with_header(arrays, header, allow_nan=True)
        elif op == "add":
            arrays[draw(st.sampled_from(["extra", "distribution.extra", "semantic.ids2"]))] = draw(random_arrays())
    return arrays


def save_pack(path: Path, arrays: dict[str, np.ndarray], compressed: bool) -> None:
    with path.open("wb") as file:
        (np.savez_compressed if compressed else np.savez)(file, **arrays)


def load_or_refuse(path: Path) -> ReferencePack | None:
    try:
        return ReferencePack.load(path)
    except SrcrError as error:
        check_user_error(error)
        return None


def test_pack_array_mutations_load(base_arrays, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-packs")
    path = folder / "case.npz"
    save_pack(path, base_arrays, compressed=True)
    assert ReferencePack.load(path) is not None  # the starting point loads

    ran = []

    @fuzz_settings(900)
    @given(mutated_arrays(base_arrays), st.booleans())
    def case(arrays: dict[str, np.ndarray], compressed: bool) -> None:
        ran.append(1)
        save_pack(path, arrays, compressed)
        load_or_refuse(path)

    case()
    assert len(ran) >= 800


def test_pack_byte_damage_load(export_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-bytes")
    original = (export_dir / "tiny.reference.npz").read_bytes()
    path = folder / "case.npz"

    ran = []

    @fuzz_settings(400)
    @given(
        st.sampled_from(["truncate", "flip", "flips", "central"]),
        st.integers(0, len(original) - 1),
        st.integers(1, 255),
        st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=2, max_size=8),
    )
    def case(op: str, position: int, mask: int, flips: list[tuple[int, int]]) -> None:
        ran.append(1)
        data = bytearray(original)
        if op == "truncate":
            del data[position:]
        elif op == "flip":
            data[position] ^= mask
        elif op == "flips":
            for where, bits in flips:
                data[where] ^= bits
        else:  # the central directory and end record: sizes, offsets, methods, flags
            where = len(original) - 1 - position % min(len(original), 2500)
            data[where] ^= mask
        path.write_bytes(bytes(data))
        load_or_refuse(path)

    case()
    assert len(ran) >= 300


def test_object_array_is_refused_without_suggesting_allow_pickle(base_arrays, tmp_path):
    arrays = dict(base_arrays)
    arrays["semantic.ids"] = np.array(["a", 1, None], dtype=object)
    path = tmp_path / "pickled.npz"
    with path.open("wb") as file:
        np.savez(file, **arrays)  # np.savez pickles object arrays
    with pytest.raises(SrcrError, match="pickled") as caught:
        ReferencePack.load(path)
    check_user_error(caught.value)


def _central_directory_entries(data: bytes) -> list[int]:
    """Offsets of every central-directory file header in a zip."""
    end = data.rindex(b"PK\x05\x06")
    size, start = struct.unpack("<II", data[end + 12 : end + 20])
    entries, offset = [], start
    while offset < start + size:
        entries.append(offset)
        name_len, extra_len, comment_len = struct.unpack("<HHH", data[offset + 28 : offset + 34])
        offset += 46 + name_len + extra_len + comment_len
    return entries


def _npy(header: dict[str, Any]) -> bytes:
    text = repr(header).encode("latin1")
    text += b" " * (63 - (len(text) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def test_absurd_sizes_are_refused_in_bounded_memory(export_dir, base_arrays, tmp_path):
    original = (export_dir / "tiny.reference.npz").read_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cases: dict[str, bytes] = {}  # each must be refused
    may_load: dict[str, bytes] = {}  # valid archives numpy never writes, or flags that change nothing

    # The zip directory declares 3 GiB uncompressed for one member.
    patched = bytearray(original)
    entry = _central_directory_entries(original)[1]
    patched[entry + 24 : entry + 28] = struct.pack("<I", 3 << 30)
    cases["declared 3 GiB"] = bytes(patched)

    # A small deflate stream of zeros that inflates to 64 MiB, under a directory that says 1 KiB;
    # and the same stream honestly declared (64 MiB is allowed, and its array is the wrong shape).
    zeros = _npy({"descr": "<i4", "fortran_order": False, "shape": (16 << 20,)}) + bytes(64 << 20)
    for declared in (1024, len(zeros)):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for key, value in base_arrays.items():
                if key != "distribution.windows":
                    stream = io.BytesIO()
                    np.save(stream, value)
                    archive.writestr(f"{key}.npy", stream.getvalue())
            archive.writestr("distribution.windows.npy", zeros)
        data = bytearray(buffer.getvalue())
        for entry in _central_directory_entries(bytes(data)):
            name_len = struct.unpack("<H", data[entry + 28 : entry + 30])[0]
            if data[entry + 46 : entry + 46 + name_len] == b"distribution.windows.npy":
                data[entry + 24 : entry + 28] = struct.pack("<I", declared)
        cases[f"zeros declared {declared}"] = bytes(data)

    # The .npy header inside a small member declares an array of 2^40 or 2^62 elements (numpy
    # allocates the declared shape before reading), or 2^40 empty strings (which take no bytes at all).
    for member, descr, shape in (
        ("distribution.top_k_ids", "<i4", (1 << 40,)),
        ("distribution.top_k_ids", "<i4", (1 << 31, 1 << 31)),
        ("distribution.top_k_ids", "<i4", (1, -1)),
        ("semantic.ids", "<U0", (1 << 40,)),
    ):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for key, value in base_arrays.items():
                stream = io.BytesIO()
                np.save(stream, value)
                body = stream.getvalue()
                if key == member:
                    body = _npy({"descr": descr, "fortran_order": False, "shape": shape}) + bytes(64)
                archive.writestr(f"{key}.npy", body)
        cases[f"npy {member} {descr} {shape}"] = buffer.getvalue()

    # A member that is not an .npy at all, and one compressed with a method numpy never writes.
    for label, method in (("raw bytes", zipfile.ZIP_DEFLATED), ("lzma", zipfile.ZIP_LZMA), ("bz2", zipfile.ZIP_BZIP2)):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", method) as archive:
            for key, value in base_arrays.items():
                stream = io.BytesIO()
                np.save(stream, value)
                body = b"not an npy" if label == "raw bytes" and key == "header" else stream.getvalue()
                archive.writestr(f"{key}.npy", body)
        (cases if label == "raw bytes" else may_load)[label] = buffer.getvalue()

    # Every method and flag value in the directory of the first member (encryption, unknown methods).
    entry = _central_directory_entries(original)[0]
    for method in (0, 1, 9, 12, 14, 99, 0xFFFF):
        data = bytearray(original)
        data[entry + 10 : entry + 12] = struct.pack("<H", method)
        cases[f"method {method}"] = bytes(data)
    # A "version needed to extract" newer than Python's zipfile reads (it raises NotImplementedError).
    for version in (64, 109, 0xFFFF):
        data = bytearray(original)
        data[entry + 6 : entry + 8] = struct.pack("<H", version)
        cases[f"extract version {version}"] = bytes(data)
    for flag in (1, 0x40, 0x2000, 0xFFFF):
        data = bytearray(original)
        data[entry + 8 : entry + 10] = struct.pack("<H", flag)
        may_load[f"flags {flag}"] = bytes(data)

    path = tmp_path / "absurd.npz"
    for label, data in (cases | may_load).items():
        path.write_bytes(data)
        try:
            ReferencePack.load(path)
        except SrcrError as error:
            check_user_error(error)
        else:
            assert label in may_load, f"{label}: a damaged pack loaded"
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert (peak_after - peak_before) * 1024 < 512 << 20, "loading a crafted pack took hundreds of MiB"


# ---------------------------------------------------------------------------------------------
# Evaluating the packs that load


def evaluate_or_refuse(runtime, pack: ReferencePack, embedder) -> None:
    try:
        evaluate(runtime, pack, embedder)
    except SrcrError as error:
        check_user_error(error)


def test_pack_mutations_evaluate(base_arrays, runtime, embedder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-evaluate")
    path = folder / "case.npz"
    ran, loaded = [], []

    @fuzz_settings(80)
    @given(mutated_arrays(base_arrays, cheap=True))
    def case(arrays: dict[str, np.ndarray]) -> None:
        ran.append(1)
        save_pack(path, arrays, compressed=False)
        pack = load_or_refuse(path)
        if pack is not None:
            loaded.append(1)
            evaluate_or_refuse(runtime, pack, embedder)

    case()
    assert len(ran) >= 60 and len(loaded) >= 20


def test_ids_outside_the_vocabulary_and_foreign_embeddings_are_refused(base_arrays, runtime, embedder, tmp_path):
    """Token ids a pack accepts (below 2^31) but the model does not know, in every place a runtime or
    a scorer uses them; and base embeddings from an embedder of another width."""
    path = tmp_path / "case.npz"

    def changed(name: str, value: Any) -> dict[str, np.ndarray]:
        arrays = dict(base_arrays)
        arrays[name] = arrays[name].copy()
        arrays[name].reshape(-1)[-1] = value
        return arrays

    names = [
        "distribution.windows", "distribution.top_k_ids", "semantic.prompt_tokens", "last_word.contexts",
        "multiple_choice.sequences",
    ]  # fmt: skip
    cases = [changed(name, value) for value in (runtime.vocab_size, 2**31 - 1) for name in names]
    for width in (1, 5, 385):
        arrays = dict(base_arrays)
        arrays["semantic.base_embeddings"] = np.ones((3, width), dtype=np.float32) / math.sqrt(width)
        cases.append(arrays)
    for arrays in cases:
        save_pack(path, arrays, compressed=False)
        with pytest.raises(SrcrError) as caught:
            evaluate(runtime, ReferencePack.load(path), embedder)
        check_user_error(caught.value)
    # A last-word target only ever compared with the runtime's choice: an unknown id is just never right.
    save_pack(path, changed("last_word.targets", runtime.vocab_size), compressed=False)
    evaluate(runtime, ReferencePack.load(path), embedder)


def test_crafted_pack_values_are_refused_at_load(base_arrays, tmp_path):
    path = tmp_path / "case.npz"
    header = str(base_arrays["header"])
    chars = base_arrays["multiple_choice.choice_chars"]
    cases = {
        "header number of 5000 digits": {"header": np.array(header.replace('"seed": 0', '"seed": ' + "7" * 5000))},
        "header nested 100000 deep": {"header": np.array('{"format": ' + "[" * 100_000 + "]" * 100_000 + "}")},
        "header NaN setting": {"header": np.array(header.replace('"seed": 0', '"windows": NaN'))},
        "choice of 2^32 characters": {"multiple_choice.choice_chars": chars.astype(np.int64) + (1 << 32)},
    }
    for label, replaced in cases.items():
        save_pack(path, base_arrays | replaced, compressed=False)
        try:
            ReferencePack.load(path)
        except SrcrError as error:
            check_user_error(error)
        else:
            pytest.fail(f"{label}: the pack loaded")
