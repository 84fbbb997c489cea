"""Wall time of lm-evaluation-harness tasks on a GGUF artifact through srcr's runtime, and what the paper's
benchmarks would take on this machine.

Exports the default SmolLM2 as Q4_K_M, then runs two local lm-eval tasks through `RuntimeLM` (no network):
a generation task of long prompts (lee.cor excerpts) that never meets its stop string, so every item
generates its whole budget, and a 4-choice log-likelihood task. From the measured seconds it prints the
prompt and generation rates and, from each benchmark's item count and lm-eval's own generation budget,
an estimate of its wall time (an upper bound for generation: small models rarely stop early).

    .venv/bin/python bench/bench_lm_eval.py [--items 4] [--prompt-tokens 1000] [--gen-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (items, prompt tokens assumed per item, lm-eval's max_gen_toks) of the paper's benchmarks in lm-eval 0.4:
# mmlu_pro (5-shot CoT), bbh_cot_fewshot (3-shot, 27 subtasks), minerva_math (4-shot).
BENCHMARKS = {
    "mmlu_pro": (12032, 1800, 2048),
    "bbh_cot_fewshot": (6511, 1200, 1024),
    "minerva_math": (5000, 1200, 1024),
}


def write_tasks(folder: Path, text: str, items: int, gen_tokens: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"prompt": text[index * 6000 : index * 6000 + 5000], "answer": "x"} for index in range(items)]
    (folder / "gen.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    mc = [{"context": text[i * 700 : i * 700 + 600], "choices": ["the", "a", "of", "and"], "answer": 0}
          for i in range(items * 4)]  # fmt: skip
    (folder / "mc.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in mc))
    (folder / "bench_gen.yaml").write_text(
        f"task: bench_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        f"generation_kwargs:\n  until: ['@@@@']\n  max_gen_toks: {gen_tokens}\nmetric_list:\n  - metric: exact_match\n"
    )
    (folder / "bench_mc.yaml").write_text(
        f"task: bench_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=4)
    parser.add_argument("--gen-tokens", type=int, default=128)
    args = parser.parse_args()

    from srcr.evaluators.harness import run_tasks, runtime_lm_class
    from srcr.exporter.calibration import evaluation_text
    from srcr.exporter.models import load_default_model
    from srcr.targets.gguf.target import GGUFTarget

    model, tokenizer = load_default_model()
    text = evaluation_text(None, None).text
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        target = GGUFTarget()
        result = target.export(model, tokenizer, target.resolve_quant(None, "Q4_K_M", {}), folder / "model.gguf")
        write_tasks(folder / "tasks", text, args.items, args.gen_tokens)
        runtime = target.open_runtime(result.artifact, "cpu")
        try:
            prompts = [json.loads(line)["prompt"] for line in (folder / "tasks" / "gen.jsonl").read_text().splitlines()]
            prompt_tokens = sum(len(runtime.tokenize(prompt)) for prompt in prompts)
            lm = runtime_lm_class()(runtime, bos_id=runtime.info().get("bos_token_id"))
            started = time.perf_counter()
            run_tasks(lm, ["bench_mc"], folder / "tasks")
            mc_seconds = time.perf_counter() - started
            # Prompt rate from a pass over the same prompts without generation (one token).
            started = time.perf_counter()
            for prompt in prompts:
                runtime.generate(runtime.tokenize(prompt), 1)
            prompt_seconds = time.perf_counter() - started
            started = time.perf_counter()
            run_tasks(lm, ["bench_gen"], folder / "tasks")
            gen_seconds = time.perf_counter() - started
        finally:
            runtime.close()
    prompt_rate = prompt_tokens / prompt_seconds
    generation_rate = args.items * args.gen_tokens / max(gen_seconds - prompt_seconds, 1e-9)
    estimates = {
        name: {
            "items": items,
            "hours_upper_bound": items * (prompt / prompt_rate + gen / generation_rate) / 3600,
            "hours_if_256_tokens_generated": items * (prompt / prompt_rate + 256 / generation_rate) / 3600,
        }
        for name, (items, prompt, gen) in BENCHMARKS.items()
    }
    print(
        json.dumps(
            {
                "model": "SmolLM2-135M-Instruct Q4_K_M, llama.cpp, CPU",
                "prompt_tokens_per_s": prompt_rate,
                "generation_tokens_per_s": generation_rate,
                "loglikelihood_items_per_s": args.items * 4 / mc_seconds,
                "settings": {"items": args.items, "prompt_tokens": prompt_tokens, "gen_tokens": args.gen_tokens},
                "estimates": estimates,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
