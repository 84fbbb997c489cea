"""lm-evaluation-harness on srcr's runtimes: any lm-eval task scored on the exact deployed file.

`RuntimeLM` is an lm-eval `LM` over the `Runtime` interface, so GGUF (llama.cpp), ONNX (ONNX Runtime) and
the dense model (PyTorch) answer the harness's three request types through the same code:

- `loglikelihood(context, continuation)`: the continuation's summed log-probability and whether greedy
  decoding would produce it, split into tokens as srcr's multiple-choice evaluator splits a choice
  (trailing context whitespace moves into the continuation; the split is read from the whole string's
  tokens, as lm-eval's own Hugging Face model does), so the two agree item for item;
- `loglikelihood_rolling(text)`: the text's log-likelihood in disjoint windows of the runtime's context;
- `generate_until(context, {until, max_gen_toks})`: greedy tokens, cut at the first stop string.

lm-eval is an optional extra (`pip install 'srcr[lm-eval]'`); `require_lm_eval` names it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from srcr.base.errors import SrcrError
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.runtime import Runtime
from srcr.evaluators.multiple_choice import continuation_loglik, continuation_rows, encode_choice

EXTRA = "pip install 'srcr[lm-eval]'"
DEFAULT_MAX_LENGTH = 2048
DEFAULT_GEN_TOKENS = 256
# The per-item metric a task is scored by, in order of preference (each is 0/1 per item).
ITEM_METRICS = ("acc_norm", "acc", "exact_match")


def require_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise SrcrError(f"lm-evaluation-harness is not installed; run `{EXTRA}`") from None
    return lm_eval


def runtime_lm_class() -> type:
    """RuntimeLM, defined against the installed lm-eval (imported only when asked for)."""
    require_lm_eval()
    from lm_eval.api.model import LM

    class RuntimeLM(LM):
        """An lm-eval model answered by one srcr `Runtime`."""

        def __init__(
            self,
            runtime: Runtime,
            bos_id: int | None = None,
            max_length: int | None = None,
            progress: ProgressFn = no_progress,
        ) -> None:
            super().__init__()
            self.runtime = runtime
            self.bos_id = bos_id
            self.max_length = int(max_length or getattr(runtime, "context_length", None) or DEFAULT_MAX_LENGTH)
            self.progress = progress

        def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
            results = []
            for index, request in enumerate(requests):
                self.progress("lm-eval: log-likelihoods", index, len(requests))
                context, continuation = request.args
                results.append(self._continuation(context, continuation))
            self.progress("lm-eval: log-likelihoods", len(requests), len(requests))
            return results

        def _continuation(self, context: str, continuation: str) -> tuple[float, bool]:
            if context:
                sequence, n_continuation = encode_choice(self.runtime.tokenize, context, continuation, self.bos_id)
            else:  # lm-eval's convention: an empty context conditions on the BOS (or end) token alone
                tokens = self.runtime.tokenize(continuation)
                sequence, n_continuation = [self._prefix_token(), *tokens], len(tokens)
            sequence = sequence[-(self.max_length + 1) :]  # left-truncated to the context, as lm-eval does
            n_continuation = min(n_continuation, len(sequence) - 1)
            rows, targets = continuation_rows(self.runtime, sequence, n_continuation)
            picked = rows[np.arange(n_continuation), targets].astype(np.float64)
            return float(picked.sum()), bool(np.all(rows.argmax(-1) == targets))

        def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
            from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

            results = []
            for index, request in enumerate(requests):
                self.progress("lm-eval: rolling log-likelihoods", index, len(requests))
                tokens = self.runtime.tokenize(request.args[0])
                windows = get_rolling_token_windows(tokens, self._prefix_token(), self.max_length, 1)
                total = 0.0
                for context, predicted in map(make_disjoint_window, windows):
                    total += continuation_loglik(self.runtime, [*context, *predicted], len(predicted))
                results.append(total)
            self.progress("lm-eval: rolling log-likelihoods", len(requests), len(requests))
            return results

        def generate_until(self, requests: list[Any]) -> list[str]:
            results = []
            for index, request in enumerate(requests):
                self.progress("lm-eval: generations", index, len(requests))
                context, settings = request.args
                results.append(self._generate(context, dict(settings or {})))
            self.progress("lm-eval: generations", len(requests), len(requests))
            return results

        def _generate(self, context: str, settings: dict[str, Any]) -> str:
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            # The prompt keeps its end and leaves room for the budget (at least one token of each).
            budget = min(int(settings.get("max_gen_toks") or DEFAULT_GEN_TOKENS), self.max_length - 1)
            prefix = [self.bos_id] if self.bos_id is not None else []
            tokens = [*prefix, *self.runtime.tokenize(context)][-(self.max_length - budget) :]
            text = self.runtime.detokenize(self.runtime.generate(tokens, budget))
            return cut_at_stops(text, until)

        def _prefix_token(self) -> int:
            if self.bos_id is not None:
                return self.bos_id
            eos = self.runtime.info().get("eos_token_id")  # lm-eval's Hugging Face model falls back to it too
            if eos is None:
                raise SrcrError("this runtime names neither a BOS nor an end token to condition an empty context on")
            return int(eos)

    return RuntimeLM


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The text up to the first of the stop strings (lm-eval's `until`)."""
    cut = len(text)
    for stop in stops:
        if stop and (found := text.find(stop)) != -1:
            cut = min(cut, found)
    return text[:cut]


@dataclass(frozen=True)
class TaskScores:
    """One lm-eval task on one model: its per-item 0/1 scores by its metric, in document order."""

    task: str
    metric: str
    scores: np.ndarray  # float64 [N], each 0 or 1
    chance: float  # 1 / choices, averaged (multiple-choice tasks); 0 for generation

    @property
    def accuracy(self) -> float:
        return float(self.scores.mean())


def run_tasks(
    lm: Any, tasks: list[str], include_path: Path | None = None, limit: int | None = None
) -> dict[str, TaskScores]:
    """Run lm-eval `tasks` on `lm` (a RuntimeLM) with per-sample logging; {task: TaskScores}."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    manager = task_manager(tasks, include_path)
    output = simple_evaluate(
        model=lm, tasks=tasks, task_manager=manager, limit=limit, log_samples=True, bootstrap_iters=0,
        verbosity="ERROR",
    )  # fmt: skip
    return {task: task_scores(task, samples) for task, samples in output["samples"].items()}


def task_scores(task: str, samples: list[dict[str, Any]]) -> TaskScores:
    if not samples:
        raise SrcrError(f"lm-eval task {task} produced no items; check its dataset")
    ordered = sorted(samples, key=lambda sample: sample["doc_id"])
    metric = next((name for name in ITEM_METRICS if name in ordered[0]), None)
    if metric is None:
        raise SrcrError(
            f"lm-eval task {task} reports {', '.join(_metrics(ordered[0]))}, none of {', '.join(ITEM_METRICS)}; "
            "srcr scores tasks by a per-item accuracy"
        )
    scores = np.array([float(sample[metric]) for sample in ordered], dtype=np.float64)
    multiple_choice = all(len(sample.get("arguments") or []) > 1 for sample in ordered) and metric != "exact_match"
    chance = float(np.mean([1.0 / len(sample["arguments"]) for sample in ordered])) if multiple_choice else 0.0
    return TaskScores(task=task, metric=metric, scores=scores, chance=chance)


def _metrics(sample: dict[str, Any]) -> list[str]:
    skip = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash"}
    return [key for key in sample if key not in skip and not key.endswith("_hash")]


def task_manager(tasks: list[str], include_path: Path | None) -> Any:
    """lm-eval's task index: the user's folder alone when it holds every task (50 ms), else with lm-eval's
    own 14,000 tasks (seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(task in local.all_tasks for task in tasks):
            return local
    return TaskManager(include_path=str(include_path) if include_path else None)


def check_tasks(tasks: list[str], include_path: Path | None) -> None:
    """Every task name resolves in lm-eval's index (with the user's task folder): before any work."""
    require_lm_eval()
    if include_path is not None and not Path(include_path).is_dir():
        raise SrcrError(f"--lm-eval-include {include_path} is not a folder of lm-eval task files")
    manager = task_manager(tasks, include_path)
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise SrcrError(
            f"lm-eval knows no task {unknown[0]!r}; list them with `lm_eval ls tasks`, or add a task folder "
            "with --lm-eval-include"
        )


@dataclass(frozen=True)
class HarnessRequest:
    """Which lm-eval tasks to run: names, a folder of the user's task files, items per task (None: all)."""

    tasks: list[str]
    include_path: Path | None = None
    limit: int | None = None


@dataclass(frozen=True)
class HarnessReference:
    """The lm-eval tasks of an evaluation and the base model's per-item scores on them, kept in the
    reference pack's header (JSON) so every artifact, and `srcr verify`, is scored against the same base."""

    tasks: list[str]
    include_path: str | None
    limit: int | None
    base: dict[str, TaskScores]

    @classmethod
    def build(
        cls,
        base: Runtime,
        bos_id: int | None,
        tasks: list[str],
        include_path: Path | None,
        limit: int | None,
        progress: ProgressFn = no_progress,
    ) -> HarnessReference:
        lm = runtime_lm_class()(base, bos_id=bos_id, progress=progress)
        scores = run_tasks(lm, tasks, include_path, limit)
        return cls(list(scores), str(include_path) if include_path else None, limit, scores)

    def score(self, runtime: Runtime, bos_id: int | None, progress: ProgressFn = no_progress) -> dict[str, Any]:
        """{task: {metric, acc, base_acc, n, chance, items}} for `runtime` on the same tasks and items."""
        lm = runtime_lm_class()(runtime, bos_id=bos_id, progress=progress)
        include = Path(self.include_path) if self.include_path else None
        found = run_tasks(lm, self.tasks, include, self.limit)
        figures = {}
        for name, base in self.base.items():
            scores = found.get(name)
            if scores is None or len(scores.scores) != len(base.scores) or scores.metric != base.metric:
                raise SrcrError(
                    f"lm-eval task {name} no longer gives the items the reference pack was built on (its task "
                    "files or lm-eval changed); rebuild the pack with srcr export"
                )
            figures[name] = {
                "metric": base.metric,
                "acc": scores.accuracy,
                "base_acc": base.accuracy,
                "n": len(base.scores),
                "chance": base.chance,
                "items": {"scores": scores.scores.tolist(), "base_scores": base.scores.tolist(), "chance": base.chance},
            }
        return figures

    def to_meta(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "include_path": self.include_path,
            "limit": self.limit,
            "base": {
                name: {"metric": task.metric, "scores": task.scores.tolist(), "chance": task.chance}
                for name, task in self.base.items()
            },
        }

    @classmethod
    def from_meta(cls, data: Any) -> HarnessReference:
        """From a pack's header: untrusted, so every field is checked."""
        damaged = SrcrError("the reference pack's lm-eval section is damaged; rebuild it with srcr export")
        try:
            tasks = [str(task) for task in data["tasks"]]
            include = data["include_path"]
            limit = data["limit"]
            base = {}
            for name, task in data["base"].items():
                scores = np.asarray(task["scores"], dtype=np.float64)
                chance = float(task["chance"])
                if scores.ndim != 1 or len(scores) < 1 or not np.all((scores == 0) | (scores == 1)):
                    raise damaged
                if not 0.0 <= chance < 1.0 or task["metric"] not in ITEM_METRICS:
                    raise damaged
                base[str(name)] = TaskScores(str(name), str(task["metric"]), scores, chance)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise damaged from None
        if set(base) != set(tasks) or not (include is None or isinstance(include, str)):
            raise damaged
        if not (limit is None or (isinstance(limit, int) and limit > 0)):
            raise damaged
        return cls(tasks, include, limit, base)
