"""`srcr sweep` on a tiny model: every configuration measured, a killed sweep resumes without repeating work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import srcr.exporter.sweep as sweep_module
from srcr.exporter.cli import app
from srcr.exporter.recipe import Recipe
from srcr.exporter.sweep import run_sweep

PROMPTS = Path(__file__).parent / "data" / "prompts_small.jsonl"
FAST_EVAL = {"windows": 2, "last_word_items": 10, "new_tokens": 8, "builtin_prompts": False, "prompts": str(PROMPTS)}


def recipe(model):
    return Recipe.model_validate(
        {
            "model": {"source": str(model)},
            "prune": {"method": "wanda"},
            "calibration": {"samples": 4, "seq_len": 64},
            "evaluate": FAST_EVAL,
            "sweep": {"sparsity": [0.0, 0.5], "bits": [4, 8]},
        }
    )


class Killed(Exception):
    pass


def test_killed_sweep_resumes_without_repeating_work(tmp_path, tiny_llama_dir, monkeypatch):
    out = tmp_path / "sweep"
    exported = []
    real_write_export = sweep_module.write_export
    prunings = []
    real_prune_stage = sweep_module.prune_stage

    def counting_write_export(*args, **kwargs):
        if len(exported) == 3 and kill["armed"]:
            raise Killed  # dies in the middle of the fourth configuration
        manifest = real_write_export(*args, **kwargs)
        exported.append(manifest.name)
        return manifest

    def counting_prune_stage(plan, dense, prune_spec, *args, **kwargs):
        prunings.append(prune_spec)
        return real_prune_stage(plan, dense, prune_spec, *args, **kwargs)

    kill = {"armed": True}
    monkeypatch.setattr(sweep_module, "write_export", counting_write_export)
    monkeypatch.setattr(sweep_module, "prune_stage", counting_prune_stage)
    with pytest.raises(Killed):
        run_sweep(recipe(tiny_llama_dir), out)
    assert len(exported) == 3 and len(prunings) == 2  # one pruning per setting, shared by both bit-widths
    assert not [path for path in out.iterdir() if path.name.startswith(".")]  # no temporary file, no lock
    done_before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.manifest.json")}
    assert len(done_before) == 3

    kill["armed"] = False
    manifests = run_sweep(recipe(tiny_llama_dir), out)
    assert len(manifests) == 4
    assert len(exported) == 4  # only the interrupted configuration ran again
    assert len(prunings) == 2  # its pruning pass was not redone: the stage cache held it
    for name, mtime in done_before.items():
        assert (out / name).stat().st_mtime_ns == mtime
    index = json.loads((out / "index.json").read_text())
    assert len(index["configurations"]) == 4

    manifests_again = run_sweep(recipe(tiny_llama_dir), out)
    assert len(exported) == 4 and len(prunings) == 2  # a finished sweep does nothing
    assert [m.name for m in manifests_again] == [m.name for m in manifests]


def test_sweep_command_prints_recommendation_and_writes_report(tmp_path, tiny_llama_dir):
    out = tmp_path / "sweep"
    args = [
        "sweep",
        "--model",
        str(tiny_llama_dir),
        "--sparsity",
        "0,0.5",
        "--bits",
        "4,8",
        "--method",
        "wanda",
        "--calib-samples",
        "4",
        "--seq-len",
        "64",
        "--eval-windows",
        "2",
        "--last-word-items",
        "10",
        "--new-tokens",
        "8",
        "--no-builtin-prompts",
        "--prompts",
        str(PROMPTS),
        "--out",
        str(out),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["records"]) == 4
    assert payload["recommended"] in {r["name"] for r in payload["records"]}
    assert payload["recommendation"].startswith("Recommended for the highest SrCr")
    assert {row["tcr"] for row in payload["equal_tcr"]} == {0.75}  # 8-bit + 50% vs 4-bit alone
    # The equal-TCr row and every record carry their uncertainty (one reference pack: paired).
    (row,) = payload["equal_tcr"]
    assert row["difference"]["low"] <= row["difference"]["value"] <= row["difference"]["high"]
    assert all(r["sr_interval"][0] <= r["sr"] <= r["sr_interval"][1] for r in payload["records"])
    report = (out / "report.html").read_text()
    assert report.startswith("<!DOCTYPE html>") and "Sr 95%" in report and "ΔSr (95%)" in report

    budget = CliRunner().invoke(app, [*args[:-1], "--budget-mb", "1000", "--json"])
    assert budget.exit_code == 0, budget.output
    assert json.loads(budget.stdout)["recommendation"].startswith("Recommended for the highest Sr within")
