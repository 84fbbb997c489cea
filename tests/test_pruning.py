"""prune_model on tiny random Llama/Qwen2 models: exact sparsity, N:M groups, grouping, imatrix, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from srcr.base.errors import SrcrError
from srcr.exporter.pruning import METHODS, PruneSpec, parse_pattern, prune_model
from srcr.exporter.pruning.driver import Group, calibrate_layer, capture_layer_inputs, decoder_layers
from srcr.exporter.pruning.sparsegpt import SparseGPT

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS = [(0.25, None), (0.5, None), (0.0, (2, 4)), (0.0, (2, 8)), (0.0, (4, 8))]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny tensors: a second thread only adds synchronisation, which is slow on a busy 2-core box.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY)).eval()


def calibration_ids(samples: int = 4, seq_len: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    layers = decoder_layers(model)
    return {
        f"{index}.{name}": module.weight.detach().clone()
        for index, layer in enumerate(layers)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("sparsity", "pattern"), SETTINGS)
def test_every_method_hits_its_target_sparsity_exactly(method, sparsity, pattern):
    model = tiny_llama()
    dense_embedding = model.model.embed_tokens.weight.clone()
    spec = PruneSpec(method=method, sparsity=sparsity, pattern=pattern)
    report = prune_model(model, calibration_ids(), spec)

    assert len(report.per_layer) == 2 * len(LINEARS)
    assert {row.layer for row in report.per_layer} == {0, 1}
    assert report.per_layer[0].name.startswith("model.layers.0.")
    for row in report.per_layer:
        assert row.sparsity == spec.target_sparsity, row
    assert report.overall_sparsity == spec.target_sparsity
    # Embeddings, norms and the LM head stay dense.
    assert torch.equal(model.model.embed_tokens.weight, dense_embedding)
    assert (model.model.norm.weight != 0).all()
    assert (model.lm_head.weight != 0).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", [(2, 4), (2, 8), (4, 8)])
def test_n_m_zeroes_exactly_n_of_every_m_consecutive_inputs(method, pattern):
    n, m = pattern
    model = tiny_llama()
    prune_model(model, calibration_ids(), PruneSpec(method=method, sparsity=0.0, pattern=pattern))
    for name, weight in linear_weights(model).items():
        zeros_per_group = (weight.reshape(weight.shape[0], -1, m) == 0).sum(dim=2)
        assert (zeros_per_group == n).all(), name


def test_sparsegpt_and_wanda_unstructured_selection_units():
    # Wanda selects per output row; SparseGPT per (matrix x 128-column block) tile: each exact.
    model = tiny_llama()
    prune_model(model, calibration_ids(), PruneSpec(method="wanda", sparsity=0.25))
    for name, weight in linear_weights(model).items():
        assert ((weight == 0).sum(dim=1) == weight.shape[1] // 4).all(), name
    model = tiny_llama()
    prune_model(model, calibration_ids(), PruneSpec(method="sparsegpt", sparsity=0.5, block_size=32))
    for name, weight in linear_weights(model).items():
        tiles = (weight == 0).reshape(weight.shape[0], -1, 32).sum(dim=(0, 2))
        assert (tiles == weight.shape[0] * 16).all(), name


def test_q_k_v_and_gate_up_share_one_accumulator():
    model = tiny_llama()
    ids = calibration_ids()
    with torch.no_grad():
        inputs, kwargs = capture_layer_inputs(model, model.model.layers, ids, torch.device("cpu"))
        spec = PruneSpec(method="sparsegpt", sparsity=0.5)
        groups = calibrate_layer(model.model.layers[0], inputs, kwargs[0], spec, SparseGPT)
    members = sorted(sorted(group.linears) for group in groups)
    assert members == [
        ["mlp.down_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
    ]
    for group in groups:
        # Fed once per sample, not once per member.
        assert group.statistics.tokens == group.method.tokens == ids.numel()
        assert group.method.hessian.shape == (group.statistics.columns, group.statistics.columns)


def layer_mean_squares(model: nn.Module, ids: torch.Tensor, index: int = 0) -> dict[str, torch.Tensor]:
    """Mean of x**2 per input column of each linear of decoder layer `index`, by plain hooks on one
    batched forward of `model` (float64 sums)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().double().reshape(-1, module.in_features)
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [
        module.register_forward_hook(hook(f"model.layers.{index}.{name}.weight"))
        for name, module in model.model.layers[index].named_modules()
        if isinstance(module, nn.Linear)
    ]
    with torch.no_grad():
        model(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


@pytest.mark.parametrize(
    "spec", [PruneSpec("sparsegpt", 0.0), PruneSpec("sparsegpt", 0.5), PruneSpec("magnitude", 0.0, (2, 4))]
)
def test_imatrix_is_the_mean_squared_input_of_the_dense_layer0(spec):
    model = tiny_llama()
    ids = calibration_ids()
    expected = layer_mean_squares(model, ids, 0)
    report = prune_model(model, ids, spec)

    assert report.imatrix_tokens == ids.numel()
    assert len(report.imatrix) == 2 * len(LINEARS)
    for name, mean_square in expected.items():
        got = report.imatrix[name]
        assert got.dtype == "float32" and got.shape == (mean_square.shape[0],)
        torch.testing.assert_close(torch.from_numpy(got).double(), mean_square, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("spec", [PruneSpec("sparsegpt", 0.5), PruneSpec("wanda", 0.0, (2, 4))])
def test_imatrix_of_a_later_layer_is_measured_behind_the_pruned_earlier_layers(spec):
    model = tiny_llama()
    ids = calibration_ids()
    dense = copy.deepcopy(model)
    report = prune_model(model, ids, spec)

    # What layer 1 saw in calibration: its inputs come out of the already pruned layer 0, and layer 1
    # itself is still dense then (a layer is pruned once all its statistics are in).
    behind_pruned = copy.deepcopy(dense)
    behind_pruned.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    assert not torch.equal(
        behind_pruned.model.layers[0].mlp.down_proj.weight, dense.model.layers[0].mlp.down_proj.weight
    )
    expected = layer_mean_squares(behind_pruned, ids, 1)
    dense_statistics = layer_mean_squares(dense, ids, 1)

    assert len(expected) == len(LINEARS)
    for name, mean_square in expected.items():
        got = torch.from_numpy(report.imatrix[name]).double()
        torch.testing.assert_close(got, mean_square, rtol=1e-5, atol=1e-8)  # measured: within 2e-7
        # Negative control: the dense model's statistics differ by far more than that tolerance
        # (measured: at least 8.7% in some column of every linear), so the check above would catch an
        # imatrix collected on dense inputs.
        change = ((dense_statistics[name] - mean_square).abs() / mean_square).max().item()
        assert change > 0.01, (name, change)


def prune_one_linear(method: str, weight: torch.Tensor, spec: PruneSpec, batches=()) -> torch.Tensor:
    """`weight` after `method` pruned it as the driver does (Group -> add_batch per batch -> prune)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data.copy_(weight)
    group = Group({"proj": linear}, spec, METHODS[method])
    for batch in batches:
        group.add_batch(batch)
    with torch.no_grad():
        group.method.prune()
    return linear.weight.detach().clone()


def lowest_mask(scores: np.ndarray, k: int, axis: int | None) -> np.ndarray:
    """Independent of masks.py: True at the k lowest scores of the array (axis None) or along `axis`."""
    mask = np.zeros(scores.shape, dtype=bool)
    if axis is None:
        mask.ravel()[np.argsort(scores, axis=None, kind="stable")[:k]] = True
    else:
        np.put_along_axis(mask, np.argsort(scores, axis=axis, kind="stable").take(range(k), axis=axis), True, axis)
    return mask


def n_m_lowest(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    rows, columns = scores.shape
    return lowest_mask(scores.reshape(rows, columns // m, m), n, axis=2).reshape(rows, columns)


def uneven_weight(rows: int = 48, columns: int = 64, seed: int = 3) -> torch.Tensor:
    """Random weights whose rows differ in scale, so per-matrix and per-row selections differ."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.empty(rows, 1).uniform_(0.1, 3.0, generator=generator)
    return torch.randn(rows, columns, generator=generator) * scales


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_magnitude_removes_exactly_the_smallest_absolute_weights_of_each_matrix(sparsity):
    weight = uneven_weight()
    pruned = prune_one_linear("magnitude", weight, PruneSpec("magnitude", sparsity))
    magnitude = weight.abs().double().numpy()
    k = math.floor(sparsity * weight.numel() + 0.5)
    expected = lowest_mask(magnitude, k, axis=None)
    np.testing.assert_array_equal(pruned.numpy() == 0, expected)
    assert torch.equal(pruned[torch.from_numpy(~expected)], weight[torch.from_numpy(~expected)])
    # Every pruned |w| lies below every kept |w|.
    assert magnitude[expected].max() < magnitude[~expected].min()
    # Negative control: the same count taken per row is another mask on these weights.
    assert (lowest_mask(magnitude, k // weight.shape[0], axis=1) != expected).sum() > 50


def test_magnitude_counts_each_matrix_of_a_group_on_its_own():
    small, large = uneven_weight(seed=4) * 0.1, uneven_weight(seed=5)
    linears = {"small": nn.Linear(64, 48, bias=False), "large": nn.Linear(64, 48, bias=False)}
    linears["small"].weight.data.copy_(small)
    linears["large"].weight.data.copy_(large)
    group = Group(linears, PruneSpec("magnitude", 0.5), METHODS["magnitude"])
    with torch.no_grad():
        group.method.prune()
    for name, weight in (("small", small), ("large", large)):
        expected = lowest_mask(weight.abs().double().numpy(), weight.numel() // 2, axis=None)
        np.testing.assert_array_equal(linears[name].weight.detach().numpy() == 0, expected, err_msg=name)


@pytest.mark.parametrize("pattern", [(2, 4), (4, 8)])
def test_magnitude_n_m_removes_the_n_smallest_of_every_m_inputs(pattern):
    weight = uneven_weight()
    pruned = prune_one_linear("magnitude", weight, PruneSpec("magnitude", 0.0, pattern))
    expected = n_m_lowest(weight.abs().double().numpy(), *pattern)
    np.testing.assert_array_equal(pruned.numpy() == 0, expected)
    assert torch.equal(pruned[torch.from_numpy(~expected)], weight[torch.from_numpy(~expected)])


def column_scaled_batches(scales: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Calibration batches [1, tokens, columns], batch b with per-column scales scales[b]."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 40, scale.shape[0], generator=generator) * scale for scale in scales]


def wanda_expected(weight: torch.Tensor, batches: list[torch.Tensor], sparsity: float, pattern) -> np.ndarray:
    """Wanda's mask from the paper: |W_ij| * ||X_j||_2 over all calibration tokens, lowest per output row."""
    x = torch.cat([batch.reshape(-1, weight.shape[1]) for batch in batches]).double().numpy()
    scores = np.abs(weight.double().numpy()) * np.sqrt(np.square(x).sum(0))[None, :]
    if pattern is not None:
        return n_m_lowest(scores, *pattern)
    return lowest_mask(scores, math.floor(sparsity * weight.shape[1] + 0.5), axis=1)


@pytest.mark.parametrize(("sparsity", "pattern"), [(0.5, None), (0.3, None), (0.0, (2, 4))])
def test_wanda_mask_follows_the_activations(sparsity, pattern):
    weight = uneven_weight()
    generator = torch.Generator().manual_seed(7)
    # Two calibration sets with different per-column scales; each spread over batches that differ
    # too, so only the norm over every token gives the right scores.
    calibrations = [[torch.empty(64).uniform_(0.05, 4.0, generator=generator) for _ in range(3)] for _ in range(2)]
    spec = PruneSpec("wanda", sparsity, pattern)
    masks = []
    for index, scales in enumerate(calibrations):
        batches = column_scaled_batches(scales, seed=index)
        pruned = prune_one_linear("wanda", weight, spec, batches)
        expected = wanda_expected(weight, batches, sparsity, pattern)
        np.testing.assert_array_equal(pruned.numpy() == 0, expected)
        assert torch.equal(pruned[torch.from_numpy(~expected)], weight[torch.from_numpy(~expected)])
        masks.append(expected)
        # Negative controls: neither |w| alone nor the last batch's norm alone gives this mask.
        assert (wanda_expected(weight, [torch.ones(1, 1, 64)], sparsity, pattern) != expected).sum() > 50
        assert (wanda_expected(weight, batches[-1:], sparsity, pattern) != expected).sum() > 10
    # Same weights, other activations: another mask.
    assert (masks[0] != masks[1]).sum() > 50


def test_sparsity_zero_changes_no_weight_but_collects_the_imatrix():
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    calls = []
    report = prune_model(model, calibration_ids(), PruneSpec("wanda", 0.0), progress=lambda *args: calls.append(args))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert report.overall_sparsity == 0.0
    assert len(report.imatrix) == 2 * len(LINEARS)
    assert calls == [("calibrate+prune layer 1/2", 1, 2), ("calibrate+prune layer 2/2", 2, 2)]


def test_pruned_model_still_runs_and_stays_close_to_dense():
    model = tiny_llama()
    ids = calibration_ids()
    with torch.no_grad():
        dense = model(ids).logits
    prune_model(model, ids, PruneSpec("sparsegpt", 0.25))
    with torch.no_grad():
        pruned = model(ids).logits
    assert torch.isfinite(pruned).all()
    assert (pruned - dense).norm() < 0.5 * dense.norm()
    assert model.config.use_cache is True and not model.training


def test_qwen2_with_biases_is_pruned():
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**TINY)).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    report = prune_model(model, calibration_ids(), PruneSpec("sparsegpt", 0.0, (2, 4)))
    assert report.overall_sparsity == 0.5
    assert len(report.per_layer) == 2 * len(LINEARS)


def test_bfloat16_model_is_pruned_in_its_dtype():
    model = tiny_llama().to(torch.bfloat16)
    report = prune_model(model, calibration_ids(), PruneSpec("sparsegpt", 0.5))
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert report.overall_sparsity == 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_matches_cpu():
    ids = calibration_ids()
    on_cpu, on_gpu = tiny_llama(), tiny_llama()
    prune_model(on_cpu, ids, PruneSpec("sparsegpt", 0.0, (2, 4)))
    report = prune_model(on_gpu, ids, PruneSpec("sparsegpt", 0.0, (2, 4)), device="cuda")
    assert report.overall_sparsity == 0.5
    assert next(on_gpu.parameters()).device.type == "cpu"
    for name, weight in linear_weights(on_cpu).items():
        other = linear_weights(on_gpu)[name]
        assert ((weight == 0) == (other == 0)).float().mean() > 0.99, name


@pytest.mark.parametrize("sparsity", [1.0, -0.1, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    model = tiny_llama()
    before = linear_weights(model)
    with pytest.raises(SrcrError, match=r"\[0, 1\)"):
        prune_model(model, calibration_ids(), PruneSpec("sparsegpt", sparsity))
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight, before[name])


def test_unknown_method_lists_the_methods():
    with pytest.raises(SrcrError, match="magnitude, wanda, sparsegpt"):
        prune_model(tiny_llama(), calibration_ids(), PruneSpec("obs", 0.5))


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "a:b", "2-4", "", "2:4:8"])
def test_bad_patterns_are_refused(text):
    with pytest.raises(SrcrError):
        parse_pattern(text)


def test_patterns_parse():
    assert parse_pattern("2:4") == (2, 4)
    assert parse_pattern(" 2 : 8 ") == (2, 8)
    assert PruneSpec("wanda", 0.0, (2, 8)).target_sparsity == 0.25


def test_pattern_that_does_not_divide_the_inputs_is_refused_before_pruning():
    model = tiny_llama()
    before = linear_weights(model)
    with pytest.raises(SrcrError, match="M=48"):
        prune_model(model, calibration_ids(), PruneSpec("wanda", 0.0, (2, 48), block_size=96))
    for name, weight in linear_weights(model).items():
        assert torch.equal(weight, before[name])


def test_models_without_a_decoder_stack_are_refused():
    with pytest.raises(SrcrError, match="model.model.layers"):
        prune_model(nn.Sequential(nn.Embedding(8, 4), nn.Linear(4, 8)), calibration_ids(), PruneSpec("wanda", 0.5))


@pytest.mark.parametrize("ids", [torch.zeros(4, dtype=torch.long), torch.zeros((2, 8), dtype=torch.float32)])
def test_bad_calibration_ids_are_refused(ids):
    with pytest.raises(SrcrError):
        prune_model(tiny_llama(), ids, PruneSpec("wanda", 0.5))


def _mixed_attention_models():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    qwen = Qwen2Config(**TINY, use_sliding_window=True, sliding_window=16, max_window_layers=1)
    gemma = Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 3},
        head_dim=16,
        sliding_window=16,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    )
    return [(Qwen2ForCausalLM, qwen), (Gemma3ForCausalLM, gemma)]


@pytest.mark.parametrize(("model_class", "config"), _mixed_attention_models(), ids=["qwen2", "gemma3"])
def test_each_layer_runs_with_its_own_attention_type_past_the_window(model_class, config):
    """Layer by layer with the caught arguments reproduces the model's own hidden states (the oracle) on
    samples twice the sliding window: a sliding layer given the full layer's mask (or rotary tables)
    would not."""
    from srcr.exporter.pruning.driver import run_layer

    assert len(set(config.layer_types)) == 2
    torch.manual_seed(0)
    model = model_class(config).eval()
    ids = calibration_ids(seq_len=32)
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True, use_cache=False).hidden_states
        inputs, kwargs = capture_layer_inputs(model, model.model.layers, ids, torch.device("cpu"))
        for index, layer in enumerate(model.model.layers):
            inputs = run_layer(layer, inputs, kwargs[index])
            # transformers reports the last layer's output after the final norm
            last = index == len(model.model.layers) - 1
            torch.testing.assert_close(model.model.norm(inputs) if last else inputs, expected[index + 1])
    report = prune_model(model, ids, PruneSpec("wanda", 0.5))
    assert report.overall_sparsity == 0.5


def test_sparsegpt_needs_m_to_divide_its_block():
    with pytest.raises(SrcrError, match="pick an M that divides 128"):
        prune_model(tiny_llama(), calibration_ids(), PruneSpec("sparsegpt", 0.0, (1, 3)))


@pytest.mark.parametrize(("spec", "passes"), [(PruneSpec("wanda", 0.0), 1), (PruneSpec("wanda", 0.5), 2)])
def test_each_layer_runs_once_per_sample_when_nothing_is_pruned(spec, passes):
    model = tiny_llama()
    ids = calibration_ids()
    calls = {index: 0 for index in range(len(model.model.layers))}
    handles = [
        layer.register_forward_hook(lambda *args, index=index: calls.__setitem__(index, calls[index] + 1))
        for index, layer in enumerate(model.model.layers)
    ]
    prune_model(model, ids, spec)
    for handle in handles:
        handle.remove()
    assert calls == {index: passes * ids.shape[0] for index in calls}
