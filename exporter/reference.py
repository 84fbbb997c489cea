"""Glue between the pipeline and the evaluators: the dense model's reference pack, and measuring an artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exporter.calibration import default_eval_file, read_text
from exporter.models import LoadedModel
from targets.base import ProgressFn, Target


def eval_settings(evaluation: Any) -> Any:
    from evaluators.reference import EvalSettings

    overrides = {
        "windows": evaluation.windows,
        "top_k": evaluation.top_k,
        "n_last_word": evaluation.last_word_items,
        "max_new_tokens": evaluation.new_tokens,
    }
    return EvalSettings(**{key: value for key, value in overrides.items() if value is not None})


def build_reference(loaded: LoadedModel, evaluation: Any, device: str, progress: ProgressFn) -> Any:
    """Run the dense model once over the evaluation inputs (before pruning touches it)."""
    from evaluators.embedder import load_embedder
    from evaluators.prompts import load_prompts
    from evaluators.reference import build_reference_pack
    from evaluators.tasks import load_mc_tasks
    from targets.torch_runtime import TorchRuntime

    eval_path = Path(evaluation.eval_text) if evaluation.eval_text else default_eval_file()
    base = TorchRuntime(loaded.model, loaded.tokenizer, device=device)
    return build_reference_pack(
        base,
        eval_settings(evaluation),
        read_text(eval_path),
        load_prompts(evaluation.prompts, include_builtin=evaluation.builtin_prompts),
        load_mc_tasks(evaluation.tasks) if evaluation.tasks else None,
        load_embedder(),
        progress,
    )


def evaluate_artifact(target: Target, artifact: Path, pack: Any, progress: ProgressFn) -> dict[str, Any]:
    from evaluators.embedder import load_embedder
    from evaluators.reference import evaluate

    runtime = target.open_runtime(artifact)
    try:
        figures = evaluate(runtime, pack, load_embedder(), progress)
        figures["runtime"] = runtime.info()
    finally:
        runtime.close()
    return figures
