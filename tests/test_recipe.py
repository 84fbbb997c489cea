"""Recipes (docs/recipe.md): the one description of a job, built by the flags, read from files, embedded in
the manifest, and replayed bit for bit; and the Python API beside the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import tomllib
import typer
from typer.testing import CliRunner

from srcr.base.errors import SrcrError
from srcr.exporter.cli import app
from srcr.exporter.flags import EXPORT_FLAGS, SWEEP_FLAGS
from srcr.exporter.recipe import Recipe, read_recipe, to_toml

runner = CliRunner()
PROMPTS = str(Path(__file__).parent / "data" / "prompts_small.jsonl")
FAST = ["--calib-samples", "4", "--seq-len", "64"]
FAST_EVAL = {"windows": 2, "last_word_items": 5, "new_tokens": 4, "builtin_prompts": False, "prompts": PROMPTS}


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def printed_recipe(*args) -> dict:
    result = invoke(*args, "--print-recipe")
    assert result.exit_code == 0, result.output
    return tomllib.loads(result.stdout)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines[-1].startswith("error:"), result.output
    assert fragment in " ".join(result.output.split()), result.output


# --- the recipe as data ------------------------------------------------------------------------------------


def test_toml_written_is_read_back_by_tomllib_as_the_same_recipe():
    awkward = 'a "quoted"\\ name\twith\nnewline, DEL \x7f, é and 😀'
    recipe = Recipe.model_validate(
        {
            "model": {"source": awkward},
            "prune": {"sparsity": 0.5, "structure": {"ffn_ratio": 0.25}},
            "evaluate": {"lm_eval_tasks": ["arc_easy", "hellaswag"]},
            "sweep": {"structures": [{}, {"drop_layers": 0.2, "depth_method": "sleb"}], "bits": [4]},
        }
    )
    assert Recipe.model_validate(tomllib.loads(recipe.to_toml())) == recipe
    assert Recipe.model_validate(tomllib.loads(Recipe().to_toml())) == Recipe()


def test_every_optional_field_defaults_to_none_so_toml_loses_nothing():
    """TOML has no null: the writer leaves None out, which is lossless only when None is the default."""

    def check(model_type):
        for name, field in model_type.model_fields.items():
            annotation = str(field.annotation)
            if "None" in annotation:
                assert field.default is None, f"{model_type.__name__}.{name}"
            if isinstance(field.default, Recipe.__mro__[1]):  # a nested stage
                check(type(field.default))

    check(Recipe)
    for stage in ("model", "calibration", "prune", "quantize", "export", "evaluate"):
        check(type(getattr(Recipe(), stage)))


def test_recipe_defaults_are_the_pruning_methods_own():
    from srcr.exporter.pruning.registry import DEFAULT_METHOD
    from srcr.exporter.pruning.spec import DEFAULT_BLOCK_SIZE, DEFAULT_PERCDAMP

    prune = Recipe().prune
    assert (prune.method, prune.percdamp, prune.block_size) == (DEFAULT_METHOD, DEFAULT_PERCDAMP, DEFAULT_BLOCK_SIZE)


def test_to_toml_refuses_what_toml_cannot_hold():
    with pytest.raises(ValueError):
        to_toml({"x": float("nan")})


@pytest.mark.parametrize(
    ("suffix", "text", "fragment"),
    [
        (".toml", "[prune]\nsparsty = 0.5\n", "prune.sparsty: Extra inputs are not permitted"),
        (".toml", '[prune]\nsparsity = "0.5"\n', "prune.sparsity: Input should be a valid number"),
        (".toml", "[prune\n", "is not valid TOML"),
        (".toml", "allow_pickle = true\n", "allow_pickle: Extra inputs are not permitted"),
        (".toml", "srcr_recipe = 2\n", "srcr_recipe"),
        (".yaml", "prune:\n  pattern: 2:4\n", "quote it"),
        (".yaml", "- 1\n- 2\n", "not a recipe"),
        (".yaml", "a: &x [1, 2]\nb: *x\n", "aliases"),
        (".json", '{"prune": {"sparsity": NaN}}', "is not valid JSON"),
        (".ini", "[prune]\n", "rename it"),
    ],
)
def test_bad_recipe_files_fail_in_one_line_before_any_work(tmp_path, suffix, text, fragment):
    path = tmp_path / f"r{suffix}"
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    assert_one_line_error(invoke("export", "--recipe", path, "--out", out), fragment)
    assert not out.exists()


def test_yaml_and_json_recipes_read_as_the_toml_one(tmp_path):
    (tmp_path / "r.toml").write_text('[prune]\npattern = "2:4"\nmethod = "wanda"\n[quantize]\nbits = 8\n')
    (tmp_path / "r.yaml").write_text("prune:\n  pattern: '2:4'\n  method: wanda\nquantize:\n  bits: 8\n")
    (tmp_path / "r.json").write_text('{"prune": {"pattern": "2:4", "method": "wanda"}, "quantize": {"bits": 8}}')
    recipes = {suffix: read_recipe(tmp_path / f"r.{suffix}") for suffix in ("toml", "yaml", "json")}
    assert recipes["toml"] == recipes["yaml"] == recipes["json"]
    assert recipes["toml"].prune.pattern == "2:4" and recipes["toml"].quantize.bits == 8


def test_relative_paths_are_the_recipe_files_own(tmp_path, monkeypatch):
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "calib.txt").write_text("some text")
    (folder / "r.toml").write_text('[calibration]\ntext = "calib.txt"\n[model]\nsource = "org/hub-model"\n')
    monkeypatch.chdir(tmp_path)  # elsewhere: the path is the file's, not the working folder's
    recipe = read_recipe(folder / "r.toml")
    assert recipe.calibration.text == str((folder / "calib.txt").resolve())
    assert recipe.model.source == "org/hub-model"  # names nothing there: a hub id stays as written


# --- flags and recipes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("command", "flags"), [("export", EXPORT_FLAGS), ("sweep", SWEEP_FLAGS)])
def test_every_flag_maps_to_a_recipe_field_and_shows_its_default(command, flags):
    """A flag's default in --help is the default recipe's value (sweep axes as comma lists)."""
    click_command = typer.main.get_command(app).commands[command]
    params = {param.name: param for param in click_command.params}
    recipe = Recipe().merged({"sweep": {}}).model_dump()
    for name, path in flags.items():
        assert name in params, f"{command} has no parameter {name} for {'.'.join(path)}"
        value = recipe
        for key in path:
            value = value[key]
        default = params[name].default
        if isinstance(value, list) and command == "sweep" and name != "structures":
            default = [] if default == "" else [type(value[0] if value else "")(item) for item in default.split(",")]
        if name == "structures":
            continue
        assert default == value or (default is None and value is None), f"--{name}: {default!r} vs {value!r}"


def test_flags_alone_build_the_default_recipe_changed_where_given():
    assert Recipe.model_validate(printed_recipe("export")) == Recipe()
    printed = Recipe.model_validate(printed_recipe("export", "--pattern", "2:4", "--bits", "3", "--no-eval"))
    assert printed == Recipe().merged(
        {"prune": {"pattern": "2:4"}, "quantize": {"bits": 3}, "evaluate": {"enabled": False}}
    )


def test_flags_given_override_the_recipe_and_flags_not_given_leave_it_alone(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[prune]\nsparsity = 0.5\nmethod = "wanda"\n[quantize]\nbits = 8\n[calibration]\nseed = 7\n')
    printed = printed_recipe("export", "--recipe", path, "--sparsity", "0.25", "--seed", "0")
    assert printed["prune"]["sparsity"] == 0.25 and printed["calibration"]["seed"] == 0  # given: theirs
    assert printed["prune"]["method"] == "wanda" and printed["quantize"]["bits"] == 8  # not given: the recipe's
    cleared = printed_recipe("export", "--recipe", path, "--sparsity", "0", "--pattern", "2:4")
    assert cleared["prune"]["pattern"] == "2:4" and cleared["prune"]["sparsity"] == 0.0


def test_a_sweep_recipe_holds_the_axes_and_export_refuses_it(tmp_path):
    printed = printed_recipe("sweep", "--sparsity", "0,0.5", "--bits", "4", "--structures", "none;ffn=0.25")
    assert printed["sweep"]["sparsity"] == [0.0, 0.5] and printed["sweep"]["bits"] == [4]
    assert [item["ffn_ratio"] for item in printed["sweep"]["structures"]] == [0.0, 0.25]
    path = tmp_path / "sweep.toml"
    path.write_text(to_toml(printed))
    assert_one_line_error(invoke("export", "--recipe", path, "--out", tmp_path / "o"), "srcr sweep --recipe")


def test_a_bad_flag_value_names_the_flag(tmp_path):
    assert_one_line_error(invoke("export", "--sparsity", "1.5", "--out", tmp_path / "o"), "--sparsity 1.5")
    assert_one_line_error(invoke("sweep", "--structures", "ffn=x", "--out", tmp_path / "o"), "--structures")


# --- the manifest's recipe, replayed ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_llama_dir):
    """A tiny model pruned by SparseGPT (the solver whose float sums a replay must redo exactly) at 8 bits."""
    out = tmp_path_factory.mktemp("exported")
    model = out / "model"
    shutil.copytree(tiny_llama_dir, model)
    result = invoke(
        "export", "--model", model, "--sparsity", "0.5", "--bits", "8", *FAST, "--no-eval", "--out", out, "--name", "m"
    )
    assert result.exit_code == 0, result.output
    return out, model


def test_the_manifest_embeds_the_resolved_recipe(exported):
    out, model = exported
    manifest = json.loads((out / "m.manifest.json").read_text())
    recipe = Recipe.model_validate(manifest["recipe"])
    assert recipe.model.source == str(model.resolve())
    assert recipe.model.weights_sha256 == manifest["source_model"]["weights_sha256"]
    assert recipe.calibration.sha256 == manifest["pruning"]["calibration"]["sha256"]
    assert recipe.quantize.bits == 8 and recipe.prune.sparsity == 0.5 and recipe.export.name == "m"
    assert recipe.model.device == "cpu"  # what `auto` chose here: a replay must not choose again


def test_replaying_a_manifest_reproduces_the_artifact_bit_for_bit(exported, tmp_path):
    out, _ = exported
    replay = tmp_path / "replay"
    result = invoke("export", "--recipe", out / "m.manifest.json", "--out", replay)
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output  # same machine, same libraries: nothing that could change the bytes
    assert sha256(replay / "m.gguf") == sha256(out / "m.gguf")
    again = json.loads((replay / "m.manifest.json").read_text())
    assert again["recipe"] == json.loads((out / "m.manifest.json").read_text())["recipe"]


def test_a_replay_with_an_override_is_another_artifact(exported, tmp_path):
    out, _ = exported
    result = invoke("export", "--recipe", out / "m.manifest.json", "--sparsity", "0.25", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert sha256(tmp_path / "m.gguf") != sha256(out / "m.gguf")
    assert json.loads((tmp_path / "m.manifest.json").read_text())["pruning"]["sparsity"] == 0.25


def test_a_replay_refuses_other_weights_or_calibration_text_before_any_work(exported, tmp_path, smollm_tokenizer):
    from tests.conftest import make_tiny_llama

    out, model = exported
    manifest = out / "m.manifest.json"
    other = tmp_path / "other-model"
    make_tiny_llama(smollm_tokenizer, seed=1).save_pretrained(other, safe_serialization=True)
    smollm_tokenizer.save_pretrained(other)
    result = invoke("export", "--recipe", manifest, "--model", other, "--out", tmp_path / "o")
    assert_one_line_error(result, "model.weights_sha256")

    calib = tmp_path / "calib.txt"
    calib.write_text("Another text entirely. " * 400)
    result = invoke("export", "--recipe", manifest, "--calib", calib, "--out", tmp_path / "o")
    assert_one_line_error(result, "calibration.sha256")
    assert not (tmp_path / "o").exists()


def test_a_manifest_without_a_recipe_is_refused_with_the_fix(exported, tmp_path):
    out, _ = exported
    data = json.loads((out / "m.manifest.json").read_text())
    del data["recipe"]
    old = tmp_path / "old.manifest.json"
    old.write_text(json.dumps(data))
    assert_one_line_error(invoke("export", "--recipe", old, "--out", tmp_path / "o"), "without recipes")
    data["recipe"] = {"prune": {"sparsity": 0.5}, "run_this": "rm -rf /"}
    forged = tmp_path / "forged.manifest.json"
    forged.write_text(json.dumps(data))
    assert_one_line_error(invoke("export", "--recipe", forged, "--out", tmp_path / "o"), "recipe.run_this")


def test_replay_notes_name_what_differs_from_the_machine_it_was_made_on(exported, tmp_path):
    from srcr.exporter.api import replay_notes

    out, _ = exported
    assert replay_notes(out / "m.manifest.json") == []
    data = json.loads((out / "m.manifest.json").read_text())
    data["versions"]["torch"] = "0.0.1"
    data["device"]["machine"] = "riscv64"
    changed = tmp_path / "changed.manifest.json"
    changed.write_text(json.dumps(data))
    notes = replay_notes(changed)
    assert any("torch" in note and "0.0.1" in note for note in notes)
    assert any("riscv64" in note for note in notes)


# --- the Python API ------------------------------------------------------------------------------------------


def test_python_api_exports_sweeps_and_verifies(tmp_path, tiny_llama_dir):
    import srcr

    recipe = {
        "prune": {"method": "wanda"},
        "calibration": {"samples": 4, "seq_len": 64},
        "evaluate": FAST_EVAL,
        "sweep": {"sparsity": [0.0, 0.5], "bits": [8]},
    }
    result = srcr.sweep(tiny_llama_dir, recipe, out=tmp_path / "sweep")
    assert [m.pruning.sparsity for m in result.manifests] == [0.0, 0.5]
    assert result.report.is_file() and result.summary.recommended["name"] in {m.name for m in result.manifests}

    # Each sweep configuration's manifest replays alone into the same file, through the API.
    pruned = result.manifests[1]
    manifest = srcr.export(recipe=tmp_path / "sweep" / f"{pruned.name}.manifest.json", out=tmp_path / "one")
    assert isinstance(manifest, srcr.Manifest) and manifest.name == pruned.name
    assert manifest.artifact.sha256 == pruned.artifact.sha256
    assert manifest.recipe == pruned.recipe

    outcome = srcr.verify(tmp_path / "one" / f"{manifest.name}.manifest.json")
    assert outcome.passed, [check for check in outcome.checks if not check.ok]

    with pytest.raises(srcr.SrcrError, match="prune.sparsty"):
        srcr.export(tiny_llama_dir, {"prune": {"sparsty": 0.5}}, out=tmp_path / "bad")
    with pytest.raises(SrcrError, match="a recipe is"):
        srcr.load_recipe(42)
