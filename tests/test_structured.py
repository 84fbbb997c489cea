"""Structured pruning: exact removals, valid GQA, bias compensation, and parity in both formats."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_gguf_helpers import sentencepiece_style_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from srcr.base.errors import SrcrError
from srcr.exporter.pruning.structured import StructureSpec, check_fits, prune_structure, surgery, width
from srcr.exporter.pruning.structured.depth import block_influence, layers_to_drop


def tiny(vocab: int = 256, layers: int = 4, heads: int = 8, kv: int = 4, ffn: int = 256, seed: int = 0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen: random weights give near-uniform distributions otherwise
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(3.0)
    return model


def ids(vocab: int = 256, samples: int = 4, length: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab, (samples, length), generator=torch.Generator().manual_seed(seed))


def log_probs(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(tokens).logits.double(), -1)


def kl(reference: torch.Tensor, other: torch.Tensor) -> float:
    return float((reference.exp() * (reference - other)).sum(-1).mean())


# --- exact removals -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_uniform_width_removes_exactly_what_was_asked_after_rounding(method):
    model = tiny()
    report = prune_structure(
        model, ids(), StructureSpec(ffn_ratio=0.3, head_ratio=0.5, width_method=method, multiple=32)
    )
    # 256 × 0.7 = 179.2 channels → the nearest multiple of 32 is 192; 4 KV groups × 0.5 → 2 kept.
    assert {(row.ffn, row.heads, row.kv_heads) for row in report.widths} == {(192, 4, 2)}
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.out_features == layer.mlp.up_proj.out_features == layer.mlp.down_proj.in_features
        assert layer.self_attn.q_proj.out_features == layer.self_attn.o_proj.in_features == 4 * 8
        assert layer.self_attn.k_proj.out_features == layer.self_attn.v_proj.out_features == 2 * 8
    assert report.parameters_after == sum(parameter.numel() for parameter in model.parameters())
    config = model.config
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads) == (192, 4, 2)
    assert any("multiples of 32" in note for note in report.notes)


def test_kept_groups_carry_their_own_query_heads():
    """GQA: query head i reads KV head i // (heads / kv); a kept group keeps exactly its query heads."""
    model = tiny()
    reference = copy.deepcopy(model.model.layers[0].self_attn)
    keep = torch.tensor([1, 3])
    surgery.shrink_attention(model.model.layers[0], keep)
    attention, dim = model.model.layers[0].self_attn, 8
    for position, group in enumerate(keep.tolist()):
        kv_rows = slice(group * dim, (group + 1) * dim)
        assert torch.equal(
            attention.k_proj.weight[position * dim : (position + 1) * dim], reference.k_proj.weight[kv_rows]
        )
        for offset in range(2):  # two query heads per group
            source = (group * 2 + offset) * dim
            target = (position * 2 + offset) * dim
            assert torch.equal(
                attention.q_proj.weight[target : target + dim], reference.q_proj.weight[source : source + dim]
            )
            assert torch.equal(
                attention.o_proj.weight[:, target : target + dim], reference.o_proj.weight[:, source : source + dim]
            )


def test_removing_groups_without_removing_heads_is_the_same_function():
    """Zeroing a group's heads in the dense model equals removing the group (no bias compensation)."""
    model, tokens = tiny(), ids()
    masked = copy.deepcopy(model)
    with torch.no_grad():
        attention = masked.model.layers[1].self_attn
        attention.o_proj.weight[:, 16:32] = 0  # group 1: query heads 2 and 3
    surgery.shrink_attention(model.model.layers[1], torch.tensor([0, 2, 3]))
    torch.testing.assert_close(log_probs(model, tokens), log_probs(masked, tokens), atol=1e-5, rtol=1e-5)


def test_depth_pruning_removes_whole_layers_and_keeps_the_cache_working():
    model = tiny(layers=6)
    report = prune_structure(model, ids(), StructureSpec(drop_layers=0.34))
    assert len(report.removed_layers) == layers_to_drop(0.34, 6) == 2
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2, 3]
    # BI picked the layers whose output stays closest to their input.
    order = np.argsort(report.layer_scores)
    assert sorted(order[:2].tolist()) == report.removed_layers
    generated = model.generate(ids()[:1, :8], max_new_tokens=6, do_sample=False, use_cache=True)
    assert generated.shape == (1, 14)


def test_block_influence_is_zero_for_an_identity_layer_and_grows_with_change():
    hidden = torch.randn(2, 16, 32)
    assert block_influence(hidden, hidden) == pytest.approx(0.0, abs=1e-12)
    assert block_influence(hidden, -hidden) == pytest.approx(2.0)
    assert 0 < block_influence(hidden, hidden + 0.5 * torch.randn_like(hidden)) < 1


def test_sleb_removes_the_layer_whose_removal_hurts_least():
    model = tiny(layers=4, seed=3)
    tokens = ids()
    report = prune_structure(copy.deepcopy(model), tokens, StructureSpec(drop_layers=0.25, depth_method="sleb"))
    losses = []  # the oracle: the whole model run without each layer in turn
    for index in range(4):
        kept = [layer for position, layer in enumerate(model.model.layers) if position != index]
        shallower = copy.deepcopy(model)
        shallower.model.layers = torch.nn.ModuleList(copy.deepcopy(kept))
        shallower.config.num_hidden_layers = 3
        with torch.no_grad():
            logits = shallower(tokens, use_cache=False).logits[:, :-1].double()
        losses.append(float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())))
    assert report.removed_layers == [int(np.argmin(losses))]
    assert report.layer_scores == [pytest.approx(min(losses))]


def test_global_allocation_ranks_layers_together():
    scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 30.0, 40.0])]
    units = [torch.tensor([-1.0, -0.9, -0.8, -0.7]), torch.tensor([0.7, 0.8, 0.9, 1.0])]
    selection = width.keep_global(scores, keep_total=4, multiple=1, minimum=1, unit_scores=units)
    assert [len(keep) for keep in selection.keep] == [1, 4]  # the second layer's units rank higher
    assert selection.keep[0].tolist() == [3]  # within a layer, the best raw scores


def test_global_allocation_takes_more_from_the_layer_with_idle_channels():
    """Scores are standardized per layer (FLAP), so what moves channels between layers is the shape of each
    layer's score distribution: three quarters of layer 1's channels write nothing and go first."""
    model = tiny(layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, :192] = 0
    report = prune_structure(
        model, ids(), StructureSpec(ffn_ratio=0.5, width_method="wanda-sp", allocation="global", multiple=32)
    )
    widths = [row.ffn for row in report.widths]
    assert widths[1] == 64 and widths[0] > 128 and widths[2] > 128, widths
    assert sum(widths) == pytest.approx(3 * 128, abs=32) and not report.uniform


def test_channel_statistics_match_numpy():
    stats = width.ChannelStatistics(5)
    chunks = [torch.randn(7, 5) * 3 + 1, torch.randn(11, 5), torch.randn(2, 3, 5)]
    for chunk in chunks:
        stats.add(chunk)
    data = np.concatenate([chunk.reshape(-1, 5).numpy() for chunk in chunks]).astype(np.float64)
    np.testing.assert_allclose(stats.mean.numpy(), data.mean(0), rtol=1e-9)
    np.testing.assert_allclose(stats.variance.numpy(), data.var(0, ddof=1), rtol=1e-9)
    np.testing.assert_allclose(stats.mean_square.numpy(), (data**2).mean(0), rtol=1e-9)


# --- bias compensation on real data --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_layer(default_checkpoint):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srcr.exporter.calibration import calibration_text, load_calibration
    from srcr.exporter.pruning.driver import capture_layer_inputs, run_layer

    model = AutoModelForCausalLM.from_pretrained(default_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(default_checkpoint)
    calibration = load_calibration(tokenizer, calibration_text(None, None), 4, 256, seed=0).input_ids
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, model.model.layers, calibration, torch.device("cpu"))
        for index in range(6):
            inputs = run_layer(model.model.layers[index], inputs, kwargs[index])
    return model.model.layers[6], inputs, kwargs[6]


# Measured on SmolLM2 (4 × 256 tokens of Lee background, a third of the FFN channels or one of three KV
# groups removed), compensated / uncompensated output error: FFN 0.98, 0.97, 0.96, 0.90, 0.95 and attention
# 0.036, 0.65, 0.60, 0.56, 0.77 on layers 1, 6, 12, 20, 28. Layer 6 is tested.
@pytest.mark.parametrize(("kind", "bound"), [("ffn", 0.99), ("attention", 0.8)])
def test_flap_bias_compensation_lowers_the_layer_output_error(smollm2_layer, kind, bound):
    from srcr.exporter.pruning.driver import run_layer

    layer, inputs, kwargs = smollm2_layer
    projection = layer.mlp.down_proj if kind == "ffn" else layer.self_attn.o_proj
    stats = width.ChannelStatistics(projection.in_features)
    handle = projection.register_forward_pre_hook(lambda module, args: stats.add(args[0]))
    with torch.no_grad():
        dense = run_layer(layer, inputs, kwargs)
    handle.remove()
    scores = width.channel_scores("flap", projection.weight, stats)
    errors = {}
    for compensate in (False, True):
        pruned = copy.deepcopy(layer)
        mean = stats.mean if compensate else None
        if kind == "ffn":
            surgery.shrink_ffn(pruned, torch.topk(scores, 1024).indices.sort().values, mean)
        else:
            groups = width.group_scores("flap", scores, 3 * 64)  # 3 query heads of 64 per KV group
            surgery.shrink_attention(pruned, torch.topk(groups, 2).indices.sort().values, mean)
        with torch.no_grad():
            errors[compensate] = float((run_layer(pruned, inputs, kwargs) - dense).square().mean())
    assert errors[True] < bound * errors[False], errors


# --- formats -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return sentencepiece_style_tokenizer()


def pruned_tiny(tokenizer, spec: StructureSpec):
    model = tiny(vocab=len(tokenizer), layers=4, ffn=256)
    calibration = torch.randint(3, len(tokenizer), (4, 64), generator=torch.Generator().manual_seed(0))
    report = prune_structure(model, calibration, spec)
    return model, report


def scored_and_generated(runtime, tokens: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The runtime's log-probabilities of `tokens` [1, n] and 8 greedy tokens after the first 10; closes it."""
    try:
        served = torch.from_numpy(runtime.logprobs(tokens[0].tolist()).astype(np.float64))
        return served, runtime.generate(tokens[0, :10].tolist(), 8)
    finally:
        runtime.close()


SPECS = [
    StructureSpec(ffn_ratio=0.5, head_ratio=0.5, width_method="flap", multiple=32),  # with biases
    StructureSpec(ffn_ratio=0.25, width_method="wanda-sp", multiple=32),
    StructureSpec(drop_layers=0.25),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.label())
def test_gguf_of_a_structured_model_matches_pytorch_and_generates(tokenizer, tmp_path, spec):
    pytest.importorskip("llama_cpp")
    from srcr.targets.gguf.convert import convert_to_gguf
    from srcr.targets.gguf.runtime import LlamaCppRuntime

    model, _ = pruned_tiny(tokenizer, spec)
    path = tmp_path / "pruned.gguf"
    convert_to_gguf(model, tokenizer, path, "F16")
    tokens = torch.randint(3, len(tokenizer), (1, 200), generator=torch.Generator().manual_seed(2))
    served, generated = scored_and_generated(LlamaCppRuntime(path, n_ctx=256), tokens)
    assert kl(log_probs(model, tokens)[0], served) < 1e-3
    assert len(generated) > 0


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.label())
def test_onnx_of_a_structured_model_matches_pytorch(tokenizer, tmp_path, spec):
    pytest.importorskip("onnxruntime")
    from srcr.targets.onnx.runtime import OrtRuntime
    from srcr.targets.onnx.target import ONNXTarget

    model, _ = pruned_tiny(tokenizer, spec)
    target = ONNXTarget()
    out = tmp_path / "pruned.onnx"
    target.export(model, tokenizer, target.resolve_quant(32, None, {}), out)
    tokens = torch.randint(3, len(tokenizer), (1, 100), generator=torch.Generator().manual_seed(2))
    served, generated = scored_and_generated(OrtRuntime(out, device="cpu"), tokens)
    assert len(generated) > 0
    assert kl(log_probs(model, tokens)[0], served) < 1e-4


def per_layer_tiny(tokenizer):
    """Layers of different widths, as global allocation leaves them (layer 0 keeps more than the others)."""
    model = tiny(vocab=len(tokenizer), layers=3, ffn=256)
    widths = [(256, [0, 1, 2, 3]), (128, [1, 2]), (64, [3])]  # (FFN channels, KV groups kept)
    for layer, (channels, groups) in zip(model.model.layers, widths, strict=True):
        surgery.shrink_ffn(layer, torch.arange(channels), torch.randn(256))
        surgery.shrink_attention(layer, torch.tensor(groups), torch.randn(64))
    surgery.record_widths(model, 8)
    return model


def test_layers_of_different_widths_become_a_deci_gguf_that_matches_pytorch(tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    import gguf

    from srcr.targets.gguf.convert import convert_to_gguf
    from srcr.targets.gguf.runtime import LlamaCppRuntime

    model = per_layer_tiny(tokenizer)
    path = tmp_path / "per-layer.gguf"
    convert_to_gguf(model, tokenizer, path, "F16")
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.architecture").contents() == "deci"
    assert reader.get_field("deci.feed_forward_length").contents() == [256, 128, 64]
    assert reader.get_field("deci.attention.head_count_kv").contents() == [4, 2, 1]
    tokens = torch.randint(3, len(tokenizer), (1, 200), generator=torch.Generator().manual_seed(2))
    served, generated = scored_and_generated(LlamaCppRuntime(path, n_ctx=256), tokens)
    assert len(generated) > 0
    assert kl(log_probs(model, tokens)[0], served) < 1e-3


def test_layers_of_different_widths_export_to_onnx_with_per_layer_caches(tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from srcr.targets.onnx.runtime import OrtRuntime
    from srcr.targets.onnx.target import ONNXTarget

    model = per_layer_tiny(tokenizer)
    target = ONNXTarget()
    out = tmp_path / "per-layer.onnx"
    target.export(model, tokenizer, target.resolve_quant(32, None, {}), out)
    tokens = torch.randint(3, len(tokenizer), (1, 100), generator=torch.Generator().manual_seed(2))
    runtime = OrtRuntime(out, device="cpu")
    kv_heads = runtime.facts.kv_heads
    served, generated = scored_and_generated(runtime, tokens)
    assert kv_heads == [4, 2, 1]
    assert kl(log_probs(model, tokens)[0], served) < 1e-4
    reference = model.generate(tokens[:, :10], max_new_tokens=8, do_sample=False)[0, 10:].tolist()
    assert generated == reference[: len(generated)]


# --- refused up front ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        (StructureSpec(drop_layers=0.95), "removes all 4 decoder layers"),
        (StructureSpec(head_ratio=0.9), "leaves none of the 4 KV groups"),
        (StructureSpec(ffn_ratio=0.99, multiple=256), "fewer than half a block"),
    ],
)
def test_requests_that_leave_nothing_are_refused_from_the_config(spec, fragment):
    with pytest.raises(SrcrError, match=fragment):
        check_fits(tiny().config, spec)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--drop-layers", "1.5"], "--drop-layers 1.5 is outside [0, 1)"),
        (["--head-ratio", "0.9"], "leaves none of the 2 KV groups"),
        (["--ffn-ratio", "0.2", "--width-method", "obs"], "unknown --width-method"),
        (["--ffn-ratio", "0.2", "--width-allocation", "spread"], "unknown --width-allocation"),
    ],
)
def test_bad_structure_requests_fail_before_any_work(tmp_path, tiny_llama_dir, args, fragment):
    from srcr.exporter.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_llama_dir), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())
    assert not out.exists()


def test_export_with_structure_records_it_and_verifies(tmp_path, tiny_llama_dir):
    import json
    from pathlib import Path

    from srcr.exporter.cli import app

    prompts = Path(__file__).parent / "data" / "prompts_small.jsonl"
    out = tmp_path / "out"
    args = ["export", "--model", str(tiny_llama_dir), "--ffn-ratio", "0.5", "--head-ratio", "0.5"]
    args += ["--drop-layers", "0.5", "--bits", "8", "--calib-samples", "4", "--seq-len", "64", "--eval-windows", "2"]
    args += ["--last-word-items", "5", "--new-tokens", "4", "--no-builtin-prompts", "--prompts", str(prompts)]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    structure = manifest["pruning"]["structure"]
    assert structure["removed_layers"] and len(structure["widths"]) == 1  # 2 layers, one removed
    assert {(row["ffn"], row["heads"], row["kv_heads"]) for row in structure["widths"]} == {(64, 2, 1)}
    removed = structure["removed_fraction"]
    assert removed == pytest.approx(1 - structure["parameters_after"] / structure["parameters_before"])
    assert manifest["compression"]["tcr"] == pytest.approx(1 - (8 / 16) * (1 - removed))
    assert manifest["name"].endswith("bi-d50-flap-f50-h50-q8-0")
    verified = CliRunner().invoke(app, ["verify", str(out / f"{manifest['name']}.manifest.json")])
    assert verified.exit_code == 0, verified.output
