"""The reference pack and `evaluate` on a tiny random Llama (SmolLM2's tokenizer), checked against plain PyTorch."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import magnitude_pruned_copy

from srcr.base.errors import SrcrError
from srcr.base.runtime import Runtime
from srcr.evaluators.embedder import load_embedder
from srcr.evaluators.lastword import last_word_items
from srcr.evaluators.multiple_choice import encode_choice
from srcr.evaluators.prompts import load_prompts
from srcr.evaluators.reference import EvalSettings, ReferencePack, build_reference_pack, evaluate
from srcr.exporter.calibration import evaluation_text
from srcr.targets.torch_runtime import TorchRuntime

SETTINGS = EvalSettings(
    windows=3, window_len=128, top_k=128, max_new_tokens=8, n_last_word=24, last_word_context=64, n_worst=2
)
MC_TASKS = [
    {"context": "The Prime Minister said the", "choices": ["government", "banana"], "answer": 0},
    {"context": "Police said the man was", "choices": ["arrested", "purple", "violin"], "answer": 0},
    {"context": "The fire spread across the", "choices": ["state", "spoon"], "answer": 0},
    {"context": "He told reporters that", "choices": ["the", "xylophone quietly"], "answer": 0},
]
LM_HEAD_STD = 0.6
# The pack's top-k KL may fall short of the full-vocabulary KL by at most this fraction
# (measured: 8% at k=128 on this model, 8-12% on SmolLM2-135M; docs/metrics.md).
TOP_K_KL_MAX_SHORTFALL = 0.15


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from srcr.exporter.models import ensure_default_checkpoint

    return AutoTokenizer.from_pretrained(ensure_default_checkpoint())


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    """Random weights, with an output layer wide enough that the top-k tokens hold most of the mass.

    At LM_HEAD_STD the top-32 tokens hold about 85% of the probability, as they do for
    SmolLM2-135M on lee.cor: the regime in which the pack's top-k KL is meant to be accurate.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, LM_HEAD_STD)
    return model.eval()


@pytest.fixture(scope="module")
def embedder():
    return load_embedder()


@pytest.fixture(scope="module")
def eval_text():
    return evaluation_text(None, None).text


@pytest.fixture(scope="module")
def pack(tiny_model, tokenizer, embedder, eval_text):
    base = TorchRuntime(tiny_model, tokenizer)
    return build_reference_pack(base, SETTINGS, eval_text, load_prompts()[:4], MC_TASKS, embedder)


@pytest.fixture(scope="module")
def identity_figures(pack, tiny_model, tokenizer, embedder):
    return evaluate(TorchRuntime(tiny_model, tokenizer), pack, embedder)


@pytest.fixture(scope="module")
def heavy_figures(pack, tiny_model, tokenizer, embedder):
    return evaluate(TorchRuntime(magnitude_pruned_copy(tiny_model, 0.9), tokenizer), pack, embedder)


def _noisy(model, scale: float, seed: int):
    damaged = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in damaged.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                weight = module.weight
                weight += scale * weight.std() * torch.randn(weight.shape, generator=generator)
    return damaged


def _scored_logprobs(model, windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary log-probabilities of the second half of every window, and the tokens that follow."""
    rows, targets = [], []
    first = windows.shape[1] // 2
    with torch.no_grad():
        for window in torch.from_numpy(windows.astype(np.int64)):
            logits = model(input_ids=window[None]).logits[0]
            rows.append(torch.log_softmax(logits[first:-1].double(), -1))
            targets.append(window[first + 1 :])
    return torch.cat(rows), torch.cat(targets)


def test_torch_runtime_implements_the_runtime_contract(tiny_model, tokenizer):
    runtime = TorchRuntime(tiny_model, tokenizer)
    assert isinstance(runtime, Runtime)
    tokens = runtime.tokenize("The bushfires spread quickly.")
    assert runtime.detokenize(tokens) == "The bushfires spread quickly."
    logprobs = runtime.logprobs(tokens)
    assert logprobs.dtype == np.float32 and logprobs.shape == (len(tokens), 49152)
    np.testing.assert_allclose(np.exp(logprobs).sum(-1), 1.0, atol=1e-4)
    generated = runtime.generate(tokens, 5)
    with torch.no_grad():
        reference = tiny_model.generate(torch.tensor([tokens]), max_new_tokens=5, do_sample=False)
    assert generated == [t for t in reference[0, len(tokens) :].tolist() if t != tokenizer.eos_token_id]
    json.dumps(runtime.info())


def test_identical_model_retains_everything(identity_figures):
    figures = identity_figures
    assert figures["kld"]["max"] < 1e-6
    assert figures["top1_agreement"] == 1.0
    assert figures["perplexity"]["compressed"] == pytest.approx(figures["perplexity"]["base"], rel=1e-6)
    assert figures["semantic"]["identical"] == 1.0
    assert figures["semantic"]["mean"] == pytest.approx(1.0, abs=1e-5)
    assert figures["last_word"]["acc"] == figures["last_word"]["base_acc"]
    assert figures["multiple_choice"]["acc_norm"] == figures["multiple_choice"]["base_acc_norm"]
    assert all(value == pytest.approx(1.0) for value in figures["retention"].values() if value is not None)
    # The same model through the same runtime: bit-identical logits, so nothing is lost at all.
    assert figures["kld"]["mean"] == 0.0
    assert figures["sr"] == 1.0
    json.dumps(figures)


def test_per_item_scores_reproduce_every_figure_and_bound_it(heavy_figures):
    """The items a manifest keeps give back the evaluators' own figures (computed from tokens, prompts and
    items directly), and each figure's interval holds it."""
    from srcr.evaluators.uncertainty import ItemScores

    figures = heavy_figures
    recomputed = ItemScores.from_dict(figures["items"]).figures()
    expected = {
        "kld_mean": figures["kld"]["mean"],
        "perplexity": figures["perplexity"]["compressed"],
        "top1_agreement": figures["top1_agreement"],
        "semantic_mean": figures["semantic"]["mean"],
        "last_word_acc": figures["last_word"]["acc"],
        "multiple_choice_acc_norm": figures["multiple_choice"]["acc_norm"],
        "sr": figures["sr"],
        **{f"retention.{name}": value for name, value in figures["retention"].items()},
    }
    for name, value in expected.items():
        assert recomputed.get(name) == (value if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)), name
        if value is not None:
            low, high = figures["intervals"][name]
            assert low <= value <= high, name
    assert figures["intervals"]["sr"][1] - figures["intervals"]["sr"][0] > 0


def expected_sr(figures: dict) -> float:
    """Sr recomputed from the evaluation's own figures by docs/metrics.md, independently of retention.py:
    each retention clipped to [0, 1], the mean over the evaluators that have a signal."""
    retentions = [
        min(1.0, figures["perplexity"]["base"] / figures["perplexity"]["compressed"]),
        min(1.0, max(0.0, figures["semantic"]["mean"])),
    ]
    if "last_word" in figures and figures["last_word"]["base_acc"] > 0:
        retentions.append(min(1.0, max(0.0, figures["last_word"]["acc"] / figures["last_word"]["base_acc"])))
    mc = figures.get("multiple_choice")
    if mc is not None and mc["base_acc_norm"] > mc["chance"]:
        retentions.append(min(1.0, max(0.0, (mc["acc_norm"] - mc["chance"]) / (mc["base_acc_norm"] - mc["chance"]))))
    return sum(retentions) / len(retentions)


def test_heavy_damage_gives_the_figures_measured_for_it(heavy_figures):
    """Magnitude pruning at 90% of this random model (measured: Sr 0.584, semantic 0.169, perplexity
    retention 1.0 (clipped: damage lowers a random model's perplexity), mean KL 1.15 nats, top-1 0.41;
    no last-word or multiple-choice signal, as the random model scores at chance)."""
    figures = heavy_figures
    assert figures["sr"] == pytest.approx(expected_sr(figures), rel=1e-12)
    assert [key for key, value in figures["retention"].items() if value is not None] == ["perplexity", "semantic"]
    assert figures["sr"] < 0.7
    assert figures["semantic"]["mean"] < 0.4
    assert figures["kld"]["mean"] > 0.5
    assert figures["top1_agreement"] < 0.6


def test_distribution_figures_match_plain_pytorch(pack, tiny_model, tokenizer, embedder):
    damaged = _noisy(tiny_model, scale=0.3, seed=1)
    figures = evaluate(TorchRuntime(damaged, tokenizer), pack, embedder)
    windows = pack.distribution.windows
    base_rows, targets = _scored_logprobs(tiny_model, windows)
    damaged_rows, _ = _scored_logprobs(damaged, windows)

    base_ppl = torch.exp(F.nll_loss(base_rows, targets)).item()
    damaged_ppl = torch.exp(F.nll_loss(damaged_rows, targets)).item()
    assert figures["perplexity"]["base"] == pytest.approx(base_ppl, rel=1e-4)
    assert figures["perplexity"]["compressed"] == pytest.approx(damaged_ppl, rel=1e-4)

    same_top = (base_rows.argmax(-1) == damaged_rows.argmax(-1)).double().mean().item()
    assert figures["top1_agreement"] == pytest.approx(same_top, abs=1e-9)

    full_kl = F.kl_div(damaged_rows, base_rows, log_target=True, reduction="none").sum(-1)
    assert 0 < figures["kld"]["mean"] <= full_kl.mean().item() * (1 + 1e-4)
    assert figures["kld"]["mean"] >= (1 - TOP_K_KL_MAX_SHORTFALL) * full_kl.mean().item()
    assert figures["kld"]["max"] <= full_kl.max().item() * (1 + 1e-4)


def test_heavy_damage_scores_clearly_lower_than_light_damage(pack, tiny_model, tokenizer, embedder, heavy_figures):
    light = evaluate(TorchRuntime(_noisy(tiny_model, scale=0.05, seed=2), tokenizer), pack, embedder)
    heavy = heavy_figures
    assert light["kld"]["mean"] < heavy["kld"]["mean"]
    assert light["top1_agreement"] > heavy["top1_agreement"]
    assert light["semantic"]["mean"] > heavy["semantic"]["mean"]
    # A random model's perplexity on real text says nothing (damage may even lower it), so here Sr
    # falls through the semantic retention; test_reference_smollm2.py checks a real model.
    assert heavy["sr"] < light["sr"] - 0.1
    assert light["speed"]["prompt_tokens_per_s"] > 0 and light["speed"]["generation_tokens_per_s"] > 0


def test_last_word_items_come_from_the_text_and_score_like_greedy_generation(pack, tiny_model, tokenizer, eval_text):
    items = pack.last_word.items
    assert len(items) == SETTINGS.n_last_word
    for item in items:
        assert tokenizer.decode(item.target) == f" {item.word}"
        assert f"{tokenizer.decode(item.context)} {item.word}" in eval_text
        assert len(item.context) <= SETTINGS.last_word_context
    with torch.no_grad():
        greedy = [
            tiny_model.generate(
                torch.tensor([item.context]),
                max_new_tokens=len(item.target),
                min_new_tokens=len(item.target),
                do_sample=False,
            )[0, len(item.context) :].tolist()
            == item.target
            for item in items
        ]
    np.testing.assert_array_equal(pack.last_word.base_correct, greedy)
    again = last_word_items(eval_text, TorchRuntime(tiny_model, tokenizer).tokenize, SETTINGS.n_last_word, 64, 0)
    assert [item.word for item in again] == [item.word for item in items]


def test_multiple_choice_matches_loglikelihoods_by_hand(pack, tiny_model, tokenizer):
    reference = pack.multiple_choice
    logliks = []
    with torch.no_grad():
        for task in MC_TASKS:
            for choice in task["choices"]:
                context = tokenizer(task["context"])["input_ids"]
                whole = tokenizer(f"{task['context']} {choice}")["input_ids"]
                assert whole[: len(context)] == context
                logprobs = torch.log_softmax(tiny_model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
                logliks.append(sum(logprobs[i - 1, whole[i]].item() for i in range(len(context), len(whole))))
    np.testing.assert_allclose(reference.base_logliks, logliks, rtol=1e-4)
    chars = [len(choice) for task in MC_TASKS for choice in task["choices"]]
    spans = np.cumsum([0] + [len(task["choices"]) for task in MC_TASKS])
    answers = [task["answer"] for task in MC_TASKS]
    acc = np.mean([np.argmax(logliks[a:b]) == y for a, b, y in zip(spans[:-1], spans[1:], answers, strict=True)])
    normalized = np.array(logliks) / chars
    acc_norm = np.mean(
        [np.argmax(normalized[a:b]) == y for a, b, y in zip(spans[:-1], spans[1:], answers, strict=True)]
    )
    assert reference.accuracies(reference.base_logliks) == (acc, acc_norm)
    sequence, n_continuation = encode_choice(tokenizer.encode, "Police said the man was ", "arrested")
    assert tokenizer.decode(sequence[-n_continuation:]) == " arrested"


def test_semantic_reports_the_worst_prompts(pack, heavy_figures):
    figures = heavy_figures
    worst = figures["semantic"]["worst"]
    assert len(worst) == SETTINGS.n_worst
    assert [row["similarity"] for row in worst] == sorted(row["similarity"] for row in worst)
    assert worst[0]["similarity"] == pytest.approx(figures["semantic"]["min"])
    by_id = dict(zip(pack.semantic.ids, pack.semantic.base_texts, strict=True))
    assert all(row["base"] == by_id[row["id"]] for row in worst)
    assert pack.semantic.prompt_format == "chat"


def test_pack_roundtrip_without_pickle(pack, tmp_path, tiny_model, tokenizer, embedder, identity_figures):
    path = tmp_path / "reference.npz"
    pack.save(path)
    with np.load(path, allow_pickle=False) as arrays:
        assert all(arrays[key].dtype != object for key in arrays.files)
    loaded = ReferencePack.load(path)
    assert loaded.settings == pack.settings and loaded.meta == json.loads(json.dumps(pack.meta))
    for name in ("distribution", "semantic", "last_word", "multiple_choice"):
        original, restored = getattr(pack, name).to_arrays(), getattr(loaded, name).to_arrays()
        assert original.keys() == restored.keys()
        for key in original:
            np.testing.assert_array_equal(original[key], restored[key], err_msg=f"{name}.{key}")
    again = evaluate(TorchRuntime(tiny_model, tokenizer), loaded, embedder)
    assert {**again, "speed": None} == {**identity_figures, "speed": None}

    with pytest.raises(SrcrError, match="already exists"):
        pack.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reference.npz"]
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(SrcrError, match="not a readable srcr reference pack"):
        ReferencePack.load(garbage)
