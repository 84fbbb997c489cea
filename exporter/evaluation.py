"""The pipeline's evaluation stages: the dense model's reference pack, and measuring an artifact.

Every evaluation input (text, prompts, tasks, settings) is read and checked by `eval_inputs`
before the first expensive stage, so a bad file costs a second, not a calibration run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from srcr.base.errors import SrcrError
from srcr.base.files import temporary_folder
from srcr.base.progress import ProgressFn
from srcr.evaluators.harness import HarnessRequest
from srcr.evaluators.reference import EvalSettings, ReferencePack
from srcr.exporter.calibration import TextSource, evaluation_text
from srcr.exporter.models import LoadedModel
from srcr.exporter.recipe import EvaluateStage
from srcr.targets.base import QuantSpec, Target
from srcr.targets.hf_tokens import chat_template_tokens


@dataclass(frozen=True)
class EvalInputs:
    settings: EvalSettings
    text: TextSource
    prompts: list[dict[str, str]]
    tasks: list[dict[str, Any]] | None
    harness: HarnessRequest | None = None


def eval_settings(stage: EvaluateStage) -> EvalSettings:
    overrides = {
        "windows": stage.windows,
        "top_k": stage.top_k,
        "n_last_word": stage.last_word_items,
        "max_new_tokens": stage.new_tokens,
    }
    settings = EvalSettings(**{key: value for key, value in overrides.items() if value is not None})
    settings.validate()
    return settings


def eval_inputs(stage: EvaluateStage) -> EvalInputs:
    """Read and check every evaluation input now."""
    from srcr.evaluators.prompts import load_prompts
    from srcr.evaluators.tasks import load_mc_tasks

    return EvalInputs(
        settings=eval_settings(stage),
        text=evaluation_text(as_path(stage.text), stage.encoding),
        prompts=load_prompts(as_path(stage.prompts), include_builtin=stage.builtin_prompts),
        tasks=load_mc_tasks(Path(stage.tasks)) if stage.tasks else None,
        harness=harness_request(stage),
    )


def as_path(value: str | None) -> Path | None:
    return None if value is None else Path(value)


def harness_request(options: EvaluateStage) -> HarnessRequest | None:
    """The lm-eval tasks asked for, every name checked against lm-eval's index now (seconds, not hours)."""
    from srcr.evaluators.harness import check_tasks

    if not options.lm_eval_tasks:
        if options.lm_eval_include is not None or options.lm_eval_limit is not None:
            raise SrcrError("--lm-eval-include and --lm-eval-limit need --lm-eval-tasks; name the tasks")
        return None
    if options.lm_eval_limit is not None and options.lm_eval_limit < 1:
        raise SrcrError(f"--lm-eval-limit {options.lm_eval_limit} must be at least 1 item per task")
    include = as_path(options.lm_eval_include)
    check_tasks(options.lm_eval_tasks, include)
    return HarnessRequest(list(options.lm_eval_tasks), include, options.lm_eval_limit)


def build_reference(loaded: LoadedModel, inputs: EvalInputs, device: str, progress: ProgressFn) -> ReferencePack:
    """Run the dense model once over the evaluation inputs (before pruning touches it); the model
    goes back to where it was afterwards."""
    from srcr.evaluators.embedder import load_embedder
    from srcr.evaluators.reference import build_reference_pack
    from srcr.targets.torch_runtime import TorchRuntime

    with TorchRuntime.borrowing(loaded.model, loaded.tokenizer, device) as base:
        pack = build_reference_pack(
            base, inputs.settings, inputs.text.text, inputs.prompts, inputs.tasks, load_embedder(), progress,
            inputs.harness,
        )  # fmt: skip
    _record_eval_text(pack, inputs)
    return pack


def build_reference_from_artifact(
    target: Target,
    spec: QuantSpec,
    loaded: LoadedModel,
    inputs: EvalInputs,
    scratch: Path,
    hints: dict[str, Any],
    progress: ProgressFn,
) -> ReferencePack:
    """The reference pack computed on the dense model's unrounded file (`spec`: the checkpoint's own dtype)
    in the target's runtime, for a model that is not held in memory. The file is written tensor by
    tensor from `loaded.weights` (or the model in memory) under `scratch`, and removed afterwards."""
    from srcr.evaluators.embedder import load_embedder
    from srcr.evaluators.reference import build_reference_pack

    with temporary_folder(scratch, "reference") as folder:
        file = folder / f"reference{target.suffix}"
        target.export(
            loaded.model, loaded.tokenizer, spec, file, hints=hints, progress=progress, weights=loaded.weights
        )
        runtime = ChatTemplated(target.open_runtime(file, device="auto"), loaded.tokenizer)
        try:
            pack = build_reference_pack(
                runtime, inputs.settings, inputs.text.text, inputs.prompts, inputs.tasks, load_embedder(), progress,
                inputs.harness,
            )  # fmt: skip
        finally:
            runtime.close()
    pack.meta["base_runtime"]["artifact_type"] = spec.quant_type
    _record_eval_text(pack, inputs)
    return pack


class ChatTemplated:
    """A runtime that prompts through the Hugging Face tokenizer's chat template, as the PyTorch reference
    does: llama.cpp's runtime renders no template, and prompts without one are another evaluation
    (SmolLM2: semantic retention 0.15 instead of 0.43 for the same file). The pack stores the prompt ids,
    so the artifact is then prompted with exactly these."""

    def __init__(self, runtime: Any, tokenizer: Any) -> None:
        self.runtime, self.tokenizer = runtime, tokenizer

    def chat_tokens(self, prompt: str) -> list[int] | None:
        return chat_template_tokens(self.tokenizer, prompt)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runtime, name)


def _record_eval_text(pack: ReferencePack, inputs: EvalInputs) -> None:
    pack.meta["eval_text"] = {
        "source": str(inputs.text.path),
        "sha256": inputs.text.sha256,
        "encoding": inputs.text.encoding,
    }


def evaluate_artifact(target: Target, artifact: Path, pack: ReferencePack, progress: ProgressFn) -> dict[str, Any]:
    """Every figure for the artifact in its own runtime (chosen by the runtime: its accelerator if any)."""
    from srcr.evaluators.embedder import load_embedder
    from srcr.evaluators.reference import evaluate

    runtime = target.open_runtime(artifact, device="auto")
    try:
        figures = evaluate(runtime, pack, load_embedder(), progress)
        figures["runtime"] = runtime.info()
    finally:
        runtime.close()
    return figures
