"""The CLI's contract for bad input: one line naming the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from srcr.exporter.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def assert_clean_failure(result, fragment, out_dir=None):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), result.output
    assert fragment in " ".join(result.output.split())
    if out_dir is not None:
        assert not out_dir.exists() or list(out_dir.iterdir()) == []


def test_help_explains_the_nm_convention():
    result = run("export", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.translate({ord(char): " " for char in "│╭╮╰╯─"}).split())
    assert "N of every M" in text


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--sparsity", "1.0"], "outside [0, 1)"),
        (["--sparsity", "-0.1"], "outside [0, 1)"),
        (["--pattern", "4:4"], "4:4"),
        (["--pattern", "two:four"], "two:four"),
        (["--method", "obs"], "sparsegpt"),
        (["--bits", "7"], "--bits"),
        (["--quant-type", "Q9_Z"], "Q9_Z"),
        (["--format", "tflite"], "gguf, onnx"),
        (["--format", "onnx", "--bits", "3"], "3-bit"),
        (["--device", "tpu"], "auto, cpu or cuda"),
        (["--sparsity", "0.25", "--pattern", "2:4"], "not both"),
    ],
)
def test_bad_settings_fail_before_any_work(tmp_path, args, fragment):
    out = tmp_path / "out"
    result = run("export", *args, "--out", str(out))
    assert_clean_failure(result, fragment, out)


def test_missing_model_path(tmp_path):
    out = tmp_path / "out"
    result = run("export", "--model", str(tmp_path / "missing"), "--out", str(out))
    assert_clean_failure(result, "--model PATH", out)


def test_folder_that_is_not_a_causal_lm(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    out = tmp_path / "out"
    result = run("export", "--model", str(model), "--out", str(out))
    assert_clean_failure(result, "not a causal language model", out)


def test_calibration_file_too_short(tmp_path, tiny_llama_dir):
    calib = tmp_path / "calib.txt"
    calib.write_text("Too short to calibrate on. " * 60)
    out = tmp_path / "out"
    result = run(
        "export",
        "--model",
        str(tiny_llama_dir),
        "--sparsity",
        "0.5",
        "--calib",
        str(calib),
        "--calib-samples",
        "64",
        "--seq-len",
        "128",
        "--no-eval",
        "--out",
        str(out),
    )
    assert_clean_failure(result, "--calib-samples", out)


def test_verify_and_compare_reject_missing_manifests(tmp_path):
    assert_clean_failure(run("verify", str(tmp_path / "x.manifest.json")), "does not exist")
    assert_clean_failure(run("compare", str(tmp_path / "x.manifest.json")), "does not exist")
    bogus = tmp_path / "bogus.json"
    bogus.write_text("{}")
    assert_clean_failure(run("compare", str(bogus)), "not an srcr manifest")
