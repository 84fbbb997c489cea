"""The evaluators on the real embedded SmolLM2-135M-Instruct: retentions behave, the top-k KL is accurate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import magnitude_pruned_copy

from srcr.evaluators.distribution import scored_rows
from srcr.evaluators.embedder import load_embedder
from srcr.evaluators.prompts import load_prompts
from srcr.evaluators.reference import EvalSettings, build_reference_pack, evaluate
from srcr.exporter.calibration import evaluation_text
from srcr.targets.torch_runtime import TorchRuntime

pytestmark = pytest.mark.slow

SETTINGS = EvalSettings(windows=2, max_new_tokens=16, n_last_word=30)
MC_TASKS = [
    {"context": "The capital of France is", "choices": ["Paris", "a banana", "blue"], "answer": 0},
    {"context": "Water freezes at zero degrees", "choices": ["Celsius", "happiness"], "answer": 0},
    {"context": "The opposite of hot is", "choices": ["cold", "seven", "running"], "answer": 0},
]
# docs/metrics.md: at the default top-k (128) the pack's KL falls 8-12% short of the full KL here.
TOP_K_KL_MAX_SHORTFALL = 0.15


@pytest.fixture(scope="module")
def smollm2():
    from srcr.exporter.models import load_default_model

    return load_default_model()


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def pack(smollm2, embedder):
    base = TorchRuntime(*smollm2)
    return build_reference_pack(
        base, SETTINGS, evaluation_text(None, None).text, load_prompts()[:6], MC_TASKS, embedder
    )


def test_dense_model_against_its_own_pack_retains_everything(smollm2, pack, embedder):
    figures = evaluate(TorchRuntime(*smollm2), pack, embedder)
    retention = figures["retention"]
    assert retention["perplexity"] is not None and retention["semantic"] is not None
    assert retention["last_word"] is not None, "SmolLM2 should get some last words right"
    assert all(value == pytest.approx(1.0) for value in retention.values() if value is not None)
    assert figures["sr"] == pytest.approx(1.0)
    assert figures["kld"]["max"] < 1e-6 and figures["top1_agreement"] == 1.0
    assert 10 < figures["perplexity"]["base"] < 100


def test_pruning_lowers_sr_and_top_k_kl_tracks_the_full_kl(smollm2, pack, embedder):
    model, tokenizer = smollm2
    pruned = magnitude_pruned_copy(model, 0.5)
    figures = evaluate(TorchRuntime(pruned, tokenizer), pack, embedder)
    assert figures["sr"] < 0.9
    assert figures["perplexity"]["compressed"] > figures["perplexity"]["base"]

    base, damaged = TorchRuntime(model, tokenizer), TorchRuntime(pruned, tokenizer)
    full = []
    for window in pack.distribution.windows:
        p, _ = scored_rows(base, window)
        q, _ = scored_rows(damaged, window)
        kl = F.kl_div(torch.from_numpy(q).double(), torch.from_numpy(p).double(), log_target=True, reduction="none")
        full.append(kl.sum(-1).numpy())
    full_mean = float(np.concatenate(full).mean())
    assert (1 - TOP_K_KL_MAX_SHORTFALL) * full_mean <= figures["kld"]["mean"] <= full_mean * (1 + 1e-4)
