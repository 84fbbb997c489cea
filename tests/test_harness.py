"""lm-evaluation-harness on srcr's runtimes, offline: local JSONL tasks (lm-eval's `dataset_path: json` form).

The harness's multiple-choice numbers must equal srcr's own multiple-choice evaluator on the same items
(an independent scorer of the same definition), and its generations must be the runtime's greedy text cut
at the task's stop strings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the lm-eval extra is part of the dev install (scripts/setup.sh)")

from srcr.evaluators.harness import cut_at_stops, run_tasks, runtime_lm_class  # noqa: E402
from srcr.evaluators.multiple_choice import MultipleChoiceReference  # noqa: E402
from srcr.targets.torch_runtime import TorchRuntime  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402

MC_ITEMS = [
    {"context": "The capital of France is", "choices": ["Paris", "a small dog", "blue"], "answer": 0},
    {"context": "Bushfires spread quickly when the wind is", "choices": ["strong", "asleep"], "answer": 0},
    {"context": "Two plus two equals", "choices": ["five", "four", "a tree", "seven"], "answer": 1},
    {"context": "The Democrats appointed an interim", "choices": ["leader", "banana"], "answer": 0},
    {"context": "Water boils at one hundred degrees", "choices": ["Celsius", "kilograms", "volts"], "answer": 0},
    {"context": "The opposite of hot is", "choices": ["cold", "loud", "square"], "answer": 0},
]
GEN_ITEMS = [
    {"question": "Q: What is the capital of France?\nA:", "answer": "Paris"},
    {"question": "Q: What colour is the sky?\nA:", "answer": "blue"},
    {"question": "Q: How many legs has a dog?\nA:", "answer": "four"},
]


def write_tasks(folder: Path) -> Path:
    """A multiple-choice and a generation task, as a user would write them for local data."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS))
    (folder / "gen.jsonl").write_text("".join(json.dumps(item) + "\n" for item in GEN_ITEMS))
    (folder / "srcr_mc.yaml").write_text(
        f"""task: srcr_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    )
    (folder / "srcr_gen.yaml").write_text(
        f"""task: srcr_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""
    )
    return folder


@pytest.fixture(scope="module")
def tasks_folder(tmp_path_factory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("lm-eval-tasks"))


@pytest.fixture(scope="module")
def tiny_model(smollm_tokenizer):
    import torch

    model = make_tiny_llama(smollm_tokenizer, seed=3)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(4.0)  # sharper than the init, so choices differ
    return model


@pytest.fixture(scope="module")
def runtime(tiny_model, smollm_tokenizer):
    return TorchRuntime(tiny_model, smollm_tokenizer)


def test_multiple_choice_agrees_with_srcrs_own_evaluator(runtime, tasks_folder):
    lm = runtime_lm_class()(runtime)
    scores = run_tasks(lm, ["srcr_mc"], tasks_folder)["srcr_mc"]
    own = MultipleChoiceReference.build(runtime, MC_ITEMS, None)
    _, correct_norm = own.correct(own.base_logliks)
    assert scores.metric == "acc_norm"
    np.testing.assert_array_equal(scores.scores, correct_norm.astype(float))
    assert scores.chance == pytest.approx(own.chance)


def test_loglikelihood_is_the_runtimes_own_sum(runtime):
    lm = runtime_lm_class()(runtime)

    class Request:
        args = ("The capital of France is", " Paris")

    ((loglik, greedy),) = lm.loglikelihood([Request()])
    context = runtime.tokenize("The capital of France is")
    whole = runtime.tokenize("The capital of France is Paris")
    rows = runtime.logprobs(whole)
    expected = sum(float(rows[position - 1, whole[position]]) for position in range(len(context), len(whole)))
    assert loglik == pytest.approx(expected, abs=1e-4)
    assert isinstance(greedy, bool)


def test_generation_is_greedy_text_cut_at_the_stop(runtime, tasks_folder):
    lm = runtime_lm_class()(runtime)
    scores = run_tasks(lm, ["srcr_gen"], tasks_folder)["srcr_gen"]
    assert scores.metric == "exact_match" and scores.chance == 0.0 and len(scores.scores) == len(GEN_ITEMS)

    class Request:
        args = (GEN_ITEMS[0]["question"], {"until": ["\n"], "max_gen_toks": 6})

    (text,) = lm.generate_until([Request()])
    greedy = runtime.detokenize(runtime.generate(runtime.tokenize(GEN_ITEMS[0]["question"]), 6))
    assert text == cut_at_stops(greedy, ["\n"])


def test_rolling_loglikelihood_covers_every_token_once(runtime):
    lm = runtime_lm_class()(runtime, max_length=8)

    class Request:
        args = ("The bushfires spread quickly across the state, and the wind did not help at all.",)

    (total,) = lm.loglikelihood_rolling([Request()])
    assert np.isfinite(total) and total < 0


def test_cut_at_stops_takes_the_earliest():
    assert cut_at_stops("four legs\nQ: next", ["\n", "Q:"]) == "four legs"
    assert cut_at_stops("no stop here", ["\n"]) == "no stop here"


def test_export_and_verify_run_lm_eval_tasks_on_the_artifact(tiny_llama_dir, tasks_folder, tmp_path):
    """From the CLI: the tasks' accuracy, base accuracy and retention land in the manifest and in Sr, with
    intervals; `srcr verify` re-runs them on the artifact."""
    from typer.testing import CliRunner

    from srcr.evaluators.retention import semantic_retention_score
    from srcr.exporter.cli import app

    out = tmp_path / "out"
    args = ["export", "--model", str(tiny_llama_dir), "--bits", "8", "--format", "gguf", "--out", str(out)]
    args += ["--calib-samples", "2", "--seq-len", "32", "--eval-windows", "2", "--last-word-items", "4"]
    args += ["--new-tokens", "4", "--no-builtin-prompts", "--prompts", str(tasks_folder / "prompts.jsonl")]
    args += ["--lm-eval-tasks", "srcr_mc,srcr_gen", "--lm-eval-include", str(tasks_folder)]
    (tasks_folder / "prompts.jsonl").write_text('{"id": "p1", "prompt": "The bushfires"}\n')
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    manifest_path = next(out.glob("*.manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    evaluation = manifest["evaluation"]
    assert set(evaluation["harness"]) == {"srcr_mc", "srcr_gen"}
    mc = evaluation["harness"]["srcr_mc"]
    assert (mc["metric"], mc["n"]) == ("acc_norm", len(MC_ITEMS))
    assert mc["chance"] == pytest.approx(np.mean([1 / len(item["choices"]) for item in MC_ITEMS]))
    assert len(evaluation["items"]["tasks"]["srcr_mc"]["scores"]) == len(MC_ITEMS)
    assert "lm_eval.srcr_mc" in evaluation["intervals"]
    assert evaluation["sr"] == pytest.approx(semantic_retention_score(evaluation["retention"]))
    assert {"lm_eval.srcr_mc", "lm_eval.srcr_gen"} <= set(evaluation["retention"])
    verified = CliRunner().invoke(app, ["verify", str(manifest_path), "--json"])
    assert verified.exit_code == 0, verified.output
    names = {check["name"] for check in json.loads(verified.stdout)["checks"]}
    assert {"harness.srcr_mc.acc", "harness.srcr_gen.acc"} <= names


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--lm-eval-tasks", "no_such_task_srcr"], "no_such_task_srcr"),
        (["--lm-eval-tasks", "srcr_mc", "--no-eval"], "drop --no-eval"),
        (["--lm-eval-limit", "5"], "need --lm-eval-tasks"),
        (["--lm-eval-tasks", "srcr_mc", "--lm-eval-limit", "0"], "at least 1"),
    ],
)
def test_bad_lm_eval_requests_fail_before_any_work(tiny_llama_dir, tmp_path, tasks_folder, extra, fragment):
    from typer.testing import CliRunner

    from srcr.exporter.cli import app

    out = tmp_path / "out"
    args = ["export", "--model", str(tiny_llama_dir), "--lm-eval-include", str(tasks_folder), "--out", str(out)]
    if "--lm-eval-tasks" not in extra:
        args = args[:3] + args[5:]  # no tasks: no task folder either
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_smollm2_artifacts_agree_with_srcrs_evaluator_through_the_harness(fmt, tasks_folder, tmp_path):
    """SmolLM2 exported unquantized, in llama.cpp and in ONNX Runtime: lm-eval's per-item picks equal srcr's
    multiple-choice evaluator on the same runtime."""
    from srcr.exporter.models import load_default_model
    from srcr.targets.registry import get_target

    model, tokenizer = load_default_model()
    target = get_target(fmt)
    spec = target.resolve_quant(16, None, {})
    result = target.export(model, tokenizer, spec, tmp_path / f"smollm2.{fmt}")
    runtime = target.open_runtime(result.artifact, "cpu")
    try:
        bos_id = runtime.info().get("bos_token_id")
        scores = run_tasks(runtime_lm_class()(runtime, bos_id=bos_id), ["srcr_mc"], tasks_folder)["srcr_mc"]
        own = MultipleChoiceReference.build(runtime, MC_ITEMS, bos_id)
    finally:
        runtime.close()
    _, correct_norm = own.correct(own.base_logliks)
    np.testing.assert_array_equal(scores.scores, correct_norm.astype(float))
    assert scores.accuracy >= 0.5  # a real model answers most of these


@pytest.mark.parametrize(
    "broken",
    [
        None,
        [],
        {"tasks": ["t"], "include_path": None, "limit": None},
        {
            "tasks": ["t"],
            "include_path": None,
            "limit": None,
            "base": {"t": {"metric": "acc", "scores": [2], "chance": 0}},
        },
        {
            "tasks": ["t"],
            "include_path": None,
            "limit": None,
            "base": {"t": {"metric": "bleu", "scores": [1], "chance": 0}},
        },
        {
            "tasks": ["t"],
            "include_path": None,
            "limit": -1,
            "base": {"t": {"metric": "acc", "scores": [1], "chance": 0}},
        },
        {
            "tasks": ["t", "u"],
            "include_path": None,
            "limit": None,
            "base": {"t": {"metric": "acc", "scores": [1], "chance": 0}},
        },
        {
            "tasks": ["t"],
            "include_path": 3,
            "limit": None,
            "base": {"t": {"metric": "acc", "scores": [1], "chance": 0}},
        },
        {
            "tasks": ["t"],
            "include_path": None,
            "limit": None,
            "base": {"t": {"metric": "acc", "scores": [], "chance": 0}},
        },
        {
            "tasks": ["t"],
            "include_path": None,
            "limit": None,
            "base": {"t": {"metric": "acc", "scores": [1], "chance": 1.5}},
        },
    ],
)
def test_a_damaged_lm_eval_section_of_a_pack_is_one_error(broken):
    from srcr.base.errors import SrcrError
    from srcr.evaluators.harness import HarnessReference

    with pytest.raises(SrcrError, match="lm-eval section is damaged"):
        HarnessReference.from_meta(broken)


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_model, smollm_tokenizer, tmp_path_factory):
    """The tiny model as an F16 GGUF and an fp32 ONNX file."""
    from srcr.targets.registry import get_target

    model = tiny_model
    folder = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for fmt, bits, quant in (("gguf", 16, None), ("onnx", None, "fp32")):
        target = get_target(fmt)
        paths[fmt] = target.export(
            model, smollm_tokenizer, target.resolve_quant(bits, quant, {}), folder / f"m.{fmt}"
        ).artifact
    return paths


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_lm_eval_runs_srcrs_models_by_name(fmt, tiny_artifacts, tasks_folder):
    """`lm_eval.simple_evaluate(model="srcr-gguf" | "srcr-onnx")` once srcr's models are registered."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from srcr.exporter.harness_models import register
    from srcr.targets.registry import get_target

    register()
    output = lm_eval.simple_evaluate(
        model=f"srcr-{fmt}", model_args={"path": str(tiny_artifacts[fmt]), "device": "cpu"}, tasks=["srcr_mc"],
        task_manager=TaskManager(include_path=str(tasks_folder), include_defaults=False), log_samples=True,
        bootstrap_iters=0,
    )  # fmt: skip
    runtime = get_target(fmt).open_runtime(tiny_artifacts[fmt], "cpu")
    try:
        own = MultipleChoiceReference.build(runtime, MC_ITEMS, runtime.info().get("bos_token_id"))
    finally:
        runtime.close()
    _, correct_norm = own.correct(own.base_logliks)
    assert output["results"]["srcr_mc"]["acc_norm,none"] == pytest.approx(correct_norm.mean())


def test_srcr_lm_eval_is_lm_evals_command_line(tiny_artifacts, tasks_folder, tmp_path):
    import subprocess
    import sys

    script = Path(sys.executable).parent / "srcr-lm-eval"
    command = [str(script), "--model", "srcr-gguf", "--model_args", f"path={tiny_artifacts['gguf']}"]
    command += ["--tasks", "srcr_mc", "--include_path", str(tasks_folder), "--output_path", str(tmp_path / "results")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "srcr_mc" in result.stdout and "acc_norm" in result.stdout
    assert list((tmp_path / "results").rglob("results_*.json"))


def test_long_requests_are_left_truncated_to_the_context(runtime):
    lm = runtime_lm_class()(runtime, max_length=8)
    context = "The bushfires spread quickly across the state and the wind did not help at all, said the"

    class Likelihood:
        args = (context, " firefighters")

    class Generation:
        args = (context, {"until": ["\n"], "max_gen_toks": 50})

    ((loglik, _),) = lm.loglikelihood([Likelihood()])
    sequence = runtime.tokenize(context + " firefighters")[-9:]
    n = len(runtime.tokenize(context + " firefighters")) - len(runtime.tokenize(context))
    rows = runtime.logprobs(sequence[:-1], first_row=len(sequence) - 1 - n)
    assert loglik == pytest.approx(float(rows[np.arange(n), sequence[-n:]].sum()), abs=1e-4)
    (text,) = lm.generate_until([Generation()])
    assert isinstance(text, str)
