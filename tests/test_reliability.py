"""Faults and hostile input (docs/reliability.md): every case ends in one line, a non-zero exit, no
traceback, nothing half-written and nothing existing lost.

Subprocess tests run the installed `srcr` command, as a user would; the rest call the same code in
process. Tiny models keep each case to seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from srcr.base.errors import SrcrError
from srcr.base.files import atomic_path, output_lock, remove_stale_partials, temp_name, writer_alive
from srcr.exporter.cli import app

SRCR = Path(sys.executable).with_name("srcr")
PROMPTS = Path(__file__).parent / "data" / "prompts_small.jsonl"
FAST = ["--calib-samples", "4", "--seq-len", "64", "--bits", "8"]
FAST_EVAL = [
    "--eval-windows",
    "2",
    "--last-word-items",
    "5",
    "--new-tokens",
    "4",
    "--no-builtin-prompts",
    "--prompts",
    str(PROMPTS),
]


def invoke(*args: str):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def assert_one_line_error(result, fragment: str, code: int = 2) -> None:
    output = result.output
    assert result.exit_code == code, output
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith(("error:", "interrupted:")), output
    assert fragment in " ".join(output.split()), output


def temporary_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.name.startswith("."))


def start_export(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [str(SRCR), "export", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the quantizer child goes down with it
        env={**os.environ, **(env or {})},
    )


def wait_for_line(process: subprocess.Popen, fragment: str, timeout: float = 120) -> list[str]:
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if fragment in line:
            return seen
    raise AssertionError(f"{fragment!r} never appeared; stderr so far: {''.join(seen)}")


# --- crash debris -------------------------------------------------------------------------------------------------


def test_temporary_files_of_dead_writers_go_and_live_ones_stay(tmp_path):
    live = tmp_path / temp_name("model.gguf")
    live.write_bytes(b"in progress")
    finished = subprocess.run(
        [sys.executable, "-c", "from srcr.base.files import temp_name; print(temp_name('model.gguf'))"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead = tmp_path / finished.stdout.strip()  # named by a process that has exited
    dead.write_bytes(b"half")
    dead_folder = tmp_path / finished.stdout.strip().replace("model.gguf", "work")
    dead_folder.mkdir()
    (dead_folder / "decoder.onnx").write_bytes(b"half")
    foreign = tmp_path / ".model.gguf.abc123.partial"  # not srcr's naming: never touched
    foreign.write_bytes(b"someone else's")

    assert writer_alive(live.name) is True and writer_alive(dead.name) is False
    removed = remove_stale_partials(tmp_path)
    assert sorted(removed) == sorted([dead, dead_folder])
    assert live.exists() and foreign.exists() and not dead.exists() and not dead_folder.exists()


def test_a_killed_export_leaves_debris_the_next_run_removes(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    args = ["--model", tiny_llama_dir, *FAST, "--no-eval", "--out", out, "--name", "tiny"]
    process = start_export(*args)
    wait_for_line(process, "quantize to")
    os.killpg(process.pid, signal.SIGSTOP)  # frozen mid-quantization: it can publish nothing now
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    debris = [path for path in temporary_files(out) if path.name.endswith(".partial")]
    assert debris, "the kill should have left temporary files"
    assert not (out / "tiny.gguf").exists()

    again = subprocess.run([str(SRCR), "export", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert temporary_files(out) == []  # debris and the lock file are gone
    manifest = json.loads((out / "tiny.manifest.json").read_text())
    assert manifest["artifact"]["bytes"] == (out / "tiny.gguf").stat().st_size


# --- Ctrl-C -------------------------------------------------------------------------------------------------------

STAGES = [
    "load model",
    "reference: perplexity",
    "reference: generations",
    "calibrate+prune",
    "convert to GGUF",
    "quantize to",
    "measure",
    "perplexity windows",
    "generations",
    "last word",
]


@pytest.mark.parametrize("stage", STAGES)
def test_ctrl_c_in_any_export_stage_leaves_nothing(tmp_path, tiny_llama_dir, stage):
    from srcr.exporter.pipeline import run_export
    from srcr.exporter.recipe import Recipe

    def interrupt_at(description: str, completed: int, total: int) -> None:
        if description.startswith(stage):
            raise KeyboardInterrupt

    out = tmp_path / "out"
    recipe = Recipe.model_validate(
        {
            "model": {"source": str(tiny_llama_dir)},
            "quantize": {"bits": 8},
            "calibration": {"samples": 4, "seq_len": 64},
            "evaluate": {
                "windows": 2, "last_word_items": 5, "new_tokens": 4, "builtin_prompts": False, "prompts": str(PROMPTS)
            },
        }
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_export(recipe, out, progress=interrupt_at)
    assert not out.exists()  # the run made the folder, and removed it again empty


def test_ctrl_c_from_the_terminal_exits_130_with_one_line(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    process = start_export("--model", tiny_llama_dir, *FAST, "--no-eval", "--out", out)
    wait_for_line(process, "calibrate+prune")
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == "interrupted: no partial output was kept"
    assert not out.exists()


@pytest.mark.slow
def test_ctrl_c_during_llama_cpp_quantization_stops_the_export(tmp_path):
    """Reported: SIGINT one second into "quantize to Q4_K_M" was swallowed by llama.cpp's log callback and the
    export finished with exit 0. The quantizer now runs in a child process the parent ends at once."""
    out = tmp_path / "out"
    process = start_export("--calib-samples", "1", "--seq-len", "64", "--no-eval", "--out", out)
    wait_for_line(process, "quantize to Q4_K_M", timeout=600)
    time.sleep(1.0)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert time.monotonic() - sent < 5, "the interrupt waited for the quantizer"
    assert stderr.strip().splitlines()[-1] == "interrupted: no partial output was kept"
    assert not out.exists()


def test_interrupted_sweep_says_what_it_kept_and_resumes(tmp_path, tiny_llama_dir, monkeypatch):
    import srcr.exporter.sweep as sweep_module

    out = tmp_path / "sweep"
    calls = []
    real_write_export = sweep_module.write_export

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_write_export(*args, **kwargs)

    args = ["sweep", "--model", tiny_llama_dir, "--sparsity", "0", "--bits", "4,8", *FAST[:4], *FAST_EVAL]
    monkeypatch.setattr(sweep_module, "write_export", interrupted_second)
    result = invoke(*args, "--out", out)
    assert_one_line_error(result, "rerun the same command to resume", code=130)
    kept = {path.name: path.stat().st_mtime_ns for path in out.glob("*.manifest.json")}
    assert len(kept) == 1 and (out / "reference.npz").is_file()
    assert temporary_files(out) == []

    monkeypatch.setattr(sweep_module, "write_export", real_write_export)
    resumed = invoke(*args, "--out", out, "--json")
    assert resumed.exit_code == 0, resumed.output
    for name, mtime in kept.items():
        assert (out / name).stat().st_mtime_ns == mtime  # the finished configuration was not redone
    assert len(list(out.glob("*.manifest.json"))) == 2


# --- full disks, read-only folders, concurrent runs ----------------------------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str):
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a tmpfs needs root (CAP_SYS_ADMIN); the simulated cases still run")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_gives_one_line_and_keeps_what_was_there(tmp_path, tiny_llama_dir):
    with mounted_tmpfs(tmp_path / "small", "size=1m") as out:
        existing = out / "earlier.gguf"
        existing.write_bytes(b"an earlier artifact")
        result = invoke("export", "--model", tiny_llama_dir, *FAST, "--no-eval", "--out", out)
        assert_one_line_error(result, "no space left on the device")
        assert existing.read_bytes() == b"an earlier artifact"
        assert sorted(path.name for path in out.iterdir()) == ["earlier.gguf"]


def test_a_full_disk_midway_through_a_write_is_one_line(tmp_path):
    def no_space(tmp: Path) -> None:
        raise OSError(28, "No space left on device", str(tmp))

    final = tmp_path / "artifact.gguf"
    message = "no space left on the device; free space or choose another --out"
    with pytest.raises(SrcrError, match=message), atomic_path(final) as tmp:
        tmp.write_bytes(b"partly")
        no_space(tmp)
    assert list(tmp_path.iterdir()) == []


def test_read_only_output_is_refused_before_any_work(tmp_path, tiny_llama_dir):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m") as out:
        started = time.monotonic()
        result = invoke("export", "--model", tiny_llama_dir, *FAST, "--out", out / "exports")
        assert_one_line_error(result, "is not writable")
        assert time.monotonic() - started < 30  # refused before loading or calibrating


def test_a_second_export_of_the_same_name_refuses_while_the_first_runs(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out, "tiny", "tiny in out"):
        result = invoke("export", "--model", tiny_llama_dir, *FAST, "--no-eval", "--out", out, "--name", "tiny")
    assert_one_line_error(result, "is being written by another srcr run")
    assert sorted(path.name for path in out.iterdir()) == []


def test_two_concurrent_exports_one_completes_the_other_refuses(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    args = ["--model", tiny_llama_dir, *FAST, "--no-eval", "--out", out, "--name", "same"]
    first = start_export(*args)
    wait_for_line(first, "load model")
    second = start_export(*args)
    _, second_err = second.communicate(timeout=300)
    _, first_err = first.communicate(timeout=300)
    codes = sorted([first.returncode, second.returncode])
    assert codes == [0, 2], (first_err, second_err)
    refusal = second_err if second.returncode == 2 else first_err
    assert "being written by another srcr run" in refusal or "already exists" in refusal
    manifest = json.loads((out / "same.manifest.json").read_text())
    from srcr.base.files import sha256_of

    assert manifest["artifact"]["sha256"] == sha256_of(out / "same.gguf")
    assert temporary_files(out) == []


# --- bad input, refused up front ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../escaped", "sub/dir", ".hidden", "", "a\\b"])
def test_a_name_is_a_file_name(tmp_path, tiny_llama_dir, name):
    out = tmp_path / "out"
    result = invoke("export", "--model", tiny_llama_dir, *FAST, "--out", out, "--name", name)
    assert_one_line_error(result, "pass a plain file name")
    assert list(tmp_path.iterdir()) == []  # nothing written, inside --out or beside it


def test_binary_calibration_data_is_refused(tmp_path, tiny_llama_dir):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    result = invoke("export", "--model", tiny_llama_dir, *FAST, "--calib", binary, "--out", tmp_path / "out")
    assert_one_line_error(result, "looks like binary data")
    assert not (tmp_path / "out").exists()


def test_latin1_text_needs_its_encoding_named_and_is_recorded(tmp_path, tiny_llama_dir):
    text = "Le café coûte 3 € à Zürich; naïve façade. " * 400
    latin = tmp_path / "latin.txt"
    latin.write_bytes(text.replace("€", "EUR").encode("latin-1"))
    out = tmp_path / "out"
    refused = invoke("export", "--model", tiny_llama_dir, *FAST, "--no-eval", "--calib", latin, "--out", out)
    assert_one_line_error(refused, "--calib-encoding latin-1")
    accepted = invoke(
        "export", "--model", tiny_llama_dir, *FAST, "--no-eval", "--calib", latin, "--calib-encoding", "latin-1",
        "--out", out, "--json",
    )  # fmt: skip
    assert accepted.exit_code == 0, accepted.output
    manifest = json.loads((out / next(p.name for p in out.glob("*.manifest.json"))).read_text())
    assert manifest["pruning"]["calibration"]["encoding"] == "iso8859-1"


def test_eval_text_in_latin1_is_refused_without_its_encoding(tmp_path, tiny_llama_dir):
    latin = tmp_path / "eval.txt"
    latin.write_bytes("Prix: 3£ la pièce. ".encode("latin-1") * 500)
    result = invoke("export", "--model", tiny_llama_dir, *FAST, "--eval-text", latin, "--out", tmp_path / "out")
    assert_one_line_error(result, "--eval-text-encoding latin-1")


def test_folders_where_files_belong_are_named_as_folders(tmp_path, tiny_llama_dir):
    assert_one_line_error(invoke("export", "--model", tiny_llama_dir, "--calib", tmp_path), "is a folder")
    assert_one_line_error(invoke("compare", tmp_path), "is a folder")


def test_compare_refuses_json_that_is_not_a_manifest(tmp_path):
    other = tmp_path / "package.json"
    other.write_text(json.dumps({"name": "left-pad", "version": "1.3.0"}))
    assert_one_line_error(invoke("compare", other), "is not an srcr manifest")


def test_compare_shows_a_manifest_given_twice_once(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    exported = invoke("export", "--model", tiny_llama_dir, *FAST, *FAST_EVAL, "--out", out, "--name", "m")
    assert exported.exit_code == 0, exported.output
    manifest = out / "m.manifest.json"
    result = invoke("compare", manifest, manifest, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows[1:]] == ["m"]
    assert "given twice" in result.stderr


def test_out_naming_an_existing_file_is_refused(tmp_path, tiny_llama_dir):
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    result = invoke("export", "--model", tiny_llama_dir, *FAST, "--out", taken)
    assert_one_line_error(result, "is a file, not a folder")
    assert taken.read_text() == "not a folder"


def test_a_model_whose_config_is_not_json_is_refused(tmp_path, tiny_llama_dir):
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, broken)
    (broken / "config.json").write_text("{ not json")
    assert_one_line_error(invoke("export", "--model", broken, *FAST), "is not valid JSON")


def test_a_truncated_safetensors_file_is_refused_before_loading(tmp_path, tiny_llama_dir):
    broken = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(invoke("export", "--model", broken, *FAST), "is damaged or truncated")


def test_sweep_with_no_bit_widths_fails_before_any_work(tmp_path, tiny_llama_dir):
    out = tmp_path / "sweep"
    started = time.monotonic()
    result = invoke("sweep", "--model", tiny_llama_dir, "--bits", "", "--out", out)
    assert_one_line_error(result, "--bits is empty")
    assert time.monotonic() - started < 10 and not out.exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--seq-len", "100000", "--calib-samples", "1"], "smaller --seq-len"),  # found after the model is loaded
        (["--seq-len", "64", "--calib-samples", "100000"], "fewer --calib-samples"),
    ],
)
def test_errors_found_after_loading_leave_no_empty_folder(tmp_path, tiny_llama_dir, args, fragment):
    out = tmp_path / "out"
    result = invoke("export", "--model", tiny_llama_dir, "--bits", "8", *args, "--out", out)
    assert_one_line_error(result, fragment)
    assert not out.exists()


def test_a_singular_hessian_names_percdamp_and_leaves_nothing(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    # 8 calibration tokens for 64-wide inputs: H has rank 8; without dampening it cannot be factored.
    result = invoke(
        "export", "--model", tiny_llama_dir, "--sparsity", "0.5", "--percdamp", "0", "--calib-samples", "1",
        "--seq-len", "8", "--bits", "8", "--no-eval", "--out", out,
    )  # fmt: skip
    assert_one_line_error(result, "--percdamp")
    assert not out.exists()


# --- files srcr reads back ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    """One tiny GGUF and one tiny ONNX export with their packs and manifests."""
    out = tmp_path_factory.mktemp("exported")
    for fmt in ("gguf", "onnx"):
        result = invoke(
            "export", "--model", tiny_llama_dir, *FAST, *FAST_EVAL, "--format", fmt, "--out", out, "--name", fmt
        )
        assert result.exit_code == 0, result.output
    return out


def copy_export(exported: Path, fmt: str, folder: Path) -> Path:
    folder.mkdir()
    suffix = ".gguf" if fmt == "gguf" else ".onnx"
    for name in (f"{fmt}{suffix}", f"{fmt}.manifest.json", f"{fmt}.reference.npz"):
        shutil.copy(exported / name, folder / name)
    return folder / f"{fmt}.manifest.json"


def edit_manifest(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_manifest_without_artifact_names_the_missing_field(tmp_path, exported):
    manifest = copy_export(exported, "gguf", tmp_path / "m")
    edit_manifest(manifest, lambda data: data.pop("artifact"))
    assert_one_line_error(invoke("verify", manifest), "artifact: Field required")
    assert_one_line_error(invoke("compare", manifest), "artifact: Field required")


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/hostname", "sub/file.gguf"])
def test_manifest_file_names_cannot_leave_their_folder(tmp_path, exported, name):
    manifest = copy_export(exported, "gguf", tmp_path / "m")
    edit_manifest(manifest, lambda data: data["artifact"].update(file=name))
    assert_one_line_error(invoke("verify", manifest), "not a plain file name beside the manifest")
    edit_manifest(manifest, lambda data: data["evaluation"]["reference_pack"].update(file=name))
    assert_one_line_error(invoke("verify", manifest), "not a plain file name beside the manifest")


def test_a_link_out_of_the_folder_is_refused(tmp_path, exported):
    manifest = copy_export(exported, "gguf", tmp_path / "m")
    outside = tmp_path / "elsewhere.gguf"
    shutil.move(manifest.parent / "gguf.gguf", outside)
    (manifest.parent / "gguf.gguf").symlink_to(outside)
    assert_one_line_error(invoke("verify", manifest), "leads outside")


def _set_sha(manifest: Path, key: str, file: Path) -> None:
    from srcr.base.files import sha256_of

    def change(data):
        entry = data["artifact"] if key == "artifact" else data["evaluation"]["reference_pack"]
        entry["sha256"] = sha256_of(file)

    edit_manifest(manifest, change)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "flipped header"])
def test_a_damaged_artifact_with_a_matching_sha_is_one_line(tmp_path, exported, fmt, damage):
    manifest = copy_export(exported, fmt, tmp_path / "m")
    artifact = manifest.parent / f"{fmt}.{'gguf' if fmt == 'gguf' else 'onnx'}"
    data = bytearray(artifact.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 3]
    elif damage == "random bytes":
        data = bytearray(os.urandom(len(data)))
    else:
        for position in range(8, 64):
            data[position] ^= 0xFF
    artifact.write_bytes(bytes(data))
    _set_sha(manifest, "artifact", artifact)
    result = invoke("verify", manifest)
    assert result.exit_code == 2, result.output
    assert_one_line_error(result, "re-export")


def test_a_pack_with_pickled_arrays_is_refused_without_suggesting_pickle(tmp_path, exported):
    import numpy as np

    manifest = copy_export(exported, "gguf", tmp_path / "m")
    pack = manifest.parent / "gguf.reference.npz"
    with np.load(pack) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays["distribution.windows"] = np.array([object()], dtype=object)
    with pack.open("wb") as handle:
        np.savez(handle, **arrays)
    _set_sha(manifest, "pack", pack)
    result = invoke("verify", manifest)
    assert_one_line_error(result, "pickled objects, which srcr never loads")
    assert "allow_pickle" not in result.output
