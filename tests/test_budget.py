"""--budget-mb / --budget-bpw: llama.cpp's own rounding per type, the allocator, the sensitivities, the file."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from test_gguf_helpers import sample_tokens, tiny_llama
from typer.testing import CliRunner

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")
torch = pytest.importorskip("torch")

from srcr.base.allocation import KlCurve, Option, allocate, relative_error  # noqa: E402
from srcr.base.errors import SrcrError  # noqa: E402
from srcr.exporter.cli import app  # noqa: E402
from srcr.exporter.sensitivity import measure_sensitivity, probe  # noqa: E402
from srcr.targets.gguf.quantize import quantize_gguf  # noqa: E402
from srcr.targets.gguf.roundtrip import roundtrip, tensor_bytes  # noqa: E402
from srcr.targets.gguf.target import GGUFTarget  # noqa: E402

runner = CliRunner()
PROMPTS = Path(__file__).parent / "data" / "prompts_small.jsonl"


TYPES = ["Q2_K", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0", "Q5_1", "Q8_0"]


@pytest.mark.parametrize("type_name", TYPES)
def test_roundtrip_is_what_llama_cpp_writes_into_the_file(wide_llama_f32, tmp_path, type_name):
    """Oracle: llama-quantize's file for one pinned tensor, decoded by gguf-py's own numpy dequantizer."""
    source, imatrix = wide_llama_f32
    name = "blk.1.ffn_up.weight"
    quantized = tmp_path / "one.gguf"
    quantize_gguf(source, quantized, "Q8_0", imatrix, pure=True, keep={name: type_name})
    written = next(t for t in gguf.GGUFReader(quantized).tensors if t.name == name)
    assert written.tensor_type.name == type_name
    from_file = gguf.quants.dequantize(np.asarray(written.data), written.tensor_type).reshape(-1, 256)
    weight = next(t for t in gguf.GGUFReader(source).tensors if t.name == name).data.reshape(-1, 256)
    ours = roundtrip(np.asarray(weight), type_name, imatrix[name])
    np.testing.assert_allclose(ours, from_file, rtol=0, atol=1e-6)
    assert int(written.n_bytes) == tensor_bytes(type_name, *ours.shape)


@pytest.mark.parametrize("type_name", ["Q2_K", "IQ3_S", "Q4_K", "Q4_0", "IQ4_NL"])
def test_llama_cpp_rounds_rows_alone_so_the_budget_check_may_round_hugging_face_rows(type_name):
    """The budget check rounds the Hugging Face matrix, whose Q/K rows the converter permutes: ggml must give
    the permuted matrix's rows the same values (targets/gguf/target.py, _whole_model_check)."""
    from srcr.targets.gguf.convert import interleave_rope_rows

    generator = np.random.default_rng(3)
    weight = generator.standard_normal((256, 256)).astype(np.float32) * generator.uniform(0.5, 2, 256)
    importance = generator.uniform(0.1, 4.0, 256).astype(np.float32)
    permuted_then_rounded = roundtrip(interleave_rope_rows(weight, 4), type_name, importance)
    rounded_then_permuted = interleave_rope_rows(roundtrip(weight, type_name, importance), 4)
    assert not np.array_equal(interleave_rope_rows(weight, 4), weight)
    np.testing.assert_array_equal(permuted_then_rounded, rounded_then_permuted)


def test_relative_error_is_the_output_error_under_uncorrelated_inputs():
    """Oracle: inputs X built with X Xᵀ / n = diag(w) exactly; then ‖ΔW X‖² / ‖W X‖² is the weighted ratio."""
    generator = np.random.default_rng(0)
    rows, columns, n = 6, 8, 32
    importance = generator.uniform(0.1, 3.0, columns)
    orthonormal, _ = np.linalg.qr(generator.standard_normal((n, columns)))  # columns orthonormal: Qᵀ Q = I
    inputs = np.sqrt(n) * np.sqrt(importance)[:, None] * orthonormal.T
    weight = generator.standard_normal((rows, columns))
    approximation = weight + 0.1 * generator.standard_normal((rows, columns))
    expected = np.square((weight - approximation) @ inputs).sum() / np.square(weight @ inputs).sum()
    assert relative_error(weight, approximation, importance) == pytest.approx(expected, rel=1e-9)


def _brute_force(options: dict[str, list[Option]], budget: int) -> float:
    best = np.inf
    for combo in itertools.product(*options.values()):
        if sum(option.bytes for option in combo) <= budget:
            best = min(best, sum(option.cost for option in combo))
    return best


def _random_options(generator: np.random.Generator) -> dict[str, list[Option]]:
    options = {}
    for tensor in range(4):
        sizes = np.sort(generator.choice(np.arange(10, 200), 4, replace=False))
        costs = np.sort(generator.uniform(0, 10, 4))[::-1]  # more bytes, less loss (mostly off any hull)
        pairs = enumerate(zip(sizes, costs, strict=True))
        options[f"t{tensor}"] = [Option(f"o{i}", int(b), float(c)) for i, (b, c) in pairs]
    return options


@pytest.mark.parametrize("seed", range(12))
def test_allocation_fits_and_is_near_the_exhaustive_optimum(seed):
    generator = np.random.default_rng(seed)
    options = _random_options(generator)
    smallest = sum(min(o.bytes for o in choices) for choices in options.values())
    largest = sum(max(o.bytes for o in choices) for choices in options.values())
    gaps = []
    for budget in np.linspace(smallest, largest, 9).astype(int):
        chosen = allocate(options, int(budget))
        assert set(chosen) == set(options)
        assert all(option in options[name] for name, option in chosen.items())
        assert sum(option.bytes for option in chosen.values()) <= budget
        optimum = _brute_force(options, int(budget))
        cost = sum(option.cost for option in chosen.values())
        assert cost >= optimum - 1e-9
        gaps.append(cost - optimum)
    # Greedy on the hulls is exact at its breakpoints and at both ends; between them it stays close.
    assert gaps[0] == pytest.approx(0) and gaps[-1] == pytest.approx(0)
    assert np.mean(gaps) < 1.0


def test_probe_levels_are_the_symmetric_grid_of_their_width():
    weight = torch.tensor([[-1.0, -0.45, 0.2, 0.75] * 8])
    for bits, levels in ((4, 16), (2, 4)):
        rounded = probe(weight, bits)
        top = 2 ** (bits - 1) - 1
        codes = rounded / (weight.abs().max() / top)
        assert torch.allclose(codes, codes.round()) and codes.min() >= -top - 1 and codes.max() <= top
        assert len(set(codes.round().flatten().tolist())) <= levels
    assert torch.allclose(probe(weight, 4)[0, :4], torch.tensor([-1.0, -3 / 7, 1 / 7, 5 / 7]))
    assert torch.allclose(probe(weight, 2)[0, :4], torch.tensor([-1.0, -0.0, 0.0, 1.0]))


def test_kl_curve_is_linear_to_the_mild_probe_and_a_power_law_through_the_coarse_one():
    curve = KlCurve.through((0.01, 0.002), (0.1, 0.2))  # a tenfold error, a hundredfold KL: exponent 2
    assert curve.exponent == pytest.approx(2.0)
    assert curve(0.01) == pytest.approx(0.002) and curve(0.005) == pytest.approx(0.001)  # linear below
    assert curve(0.1) == pytest.approx(0.2) and curve(0.05) == pytest.approx(0.002 * 25)
    assert KlCurve.through((0.01, 0.002), (0.1, 0.5)).exponent == pytest.approx(2.0 + np.log10(2.5))
    assert KlCurve.through((0.01, 0.002), (0.1, 1e6)).exponent == 3.0  # bounded: a noisy probe cannot explode it
    assert KlCurve.through((0.01, 0.002), (0.1, 0.001)).exponent == 0.5  # nor make the curve fall
    assert KlCurve.through((0.01, 0.002), None)(0.1) == pytest.approx(0.02)
    assert KlCurve.through((0.0, 0.0), (0.1, 0.2))(0.5) == 0.0  # a matrix the probes do not move: free


def test_allocation_refuses_a_budget_below_the_smallest_choice():
    options = {"a": [Option("small", 10, 5.0), Option("big", 20, 1.0)]}
    with pytest.raises(SrcrError, match="smallest allocation takes 10"):
        allocate(options, 9)


def test_probe_kl_is_the_kl_of_the_model_with_that_matrix_alone_rounded(small_vocab_tokenizer):
    """Oracle: the whole Hugging Face forward with one matrix replaced by its probe rounding."""
    import copy

    model = tiny_llama(small_vocab_tokenizer, hidden=64, intermediate=128, num_hidden_layers=3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ids = torch.tensor([sample_tokens(small_vocab_tokenizer)[:96]])
    measured = measure_sensitivity(model, ids, None)
    for name, module_name in [
        ("model.layers.1.mlp.down_proj.weight", "model.layers.1.mlp.down_proj"),
        ("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj"),
        ("model.embed_tokens.weight", "model.embed_tokens"),
    ]:
        for bits, measured_kl in ((4, measured[name].probe_kl), (2, measured[name].coarse_kl)):
            changed = copy.deepcopy(model)
            module = changed.get_submodule(module_name)
            with torch.no_grad():
                module.weight.copy_(probe(module.weight, bits))
                reference = torch.log_softmax(model(ids).logits[0].float(), -1)
                candidate = torch.log_softmax(changed(ids).logits[0].float(), -1)
            expected = float((reference.exp() * (reference - candidate)).sum(-1).mean())
            assert measured_kl == pytest.approx(expected, rel=1e-3, abs=1e-7)
            assert measured_kl > 0
        assert measured[name].coarse_error > measured[name].probe_error
    assert set(measured) == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    ("bits", "quant_type", "options", "fragment"),
    [
        (4, None, {"budget_mb": 10.0}, "drop --bits"),
        (None, "Q4_K_M", {"budget_mb": 10.0}, "drop --bits"),
        (None, None, {"budget_mb": 10.0, "budget_bpw": 4.0}, "not both"),
        (None, None, {"budget_bpw": 1.0}, "2 to 8.5"),
        (None, None, {"budget_mb": -1.0}, "must be positive"),
        (None, None, {"budget_mb": 10.0, "quantizer": "gptq"}, "use --quantizer llama.cpp or auto"),
        (None, None, {"budget_mb": 10.0, "pure": True}, "use --quantizer llama.cpp or auto"),
    ],
)
def test_budget_requests_that_contradict_themselves_are_refused(bits, quant_type, options, fragment):
    with pytest.raises(SrcrError, match=fragment.replace("(", r"\(")):
        GGUFTarget().resolve_quant(bits, quant_type, options)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory, smollm_tokenizer):
    """A saved 256-wide random Llama with SmolLM2's tokenizer, for the CLI."""
    folder = tmp_path_factory.mktemp("wide-llama")
    tiny_llama(smollm_tokenizer, hidden=256, intermediate=512).save_pretrained(folder, safe_serialization=True)
    smollm_tokenizer.save_pretrained(folder)
    return folder


def _export(model_dir, out, *flags):
    args = ["export", "--model", str(model_dir), "--calib-samples", "2", "--seq-len", "64", "--no-eval"]
    return runner.invoke(app, [*args, "--out", str(out), "--json", *flags])


def test_budget_export_fits_and_writes_what_it_chose(wide_model_dir, tmp_path):
    preset = _export(wide_model_dir, tmp_path / "preset", "--quant-type", "Q4_K_M")
    assert preset.exit_code == 0, preset.output
    preset_bytes = json.loads(preset.stdout)["artifact"]["bytes"]
    manifests = {}
    for label, budget in (("tight", preset_bytes * 0.85), ("preset", preset_bytes)):
        result = _export(wide_model_dir, tmp_path / label, "--budget-mb", f"{budget / 1e6:.6f}")
        assert result.exit_code == 0, result.output
        manifest = json.loads(result.stdout)
        path = tmp_path / label / manifest["artifact"]["file"]
        assert path.stat().st_size == manifest["artifact"]["bytes"] <= budget
        allocation = manifest["quantization"]["allocation"]
        written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2}
        assert written == allocation["tensors"]
        assert manifest["quantization"]["type"].startswith("budget-")
        assert manifest["recipe"]["quantize"]["budget_mb"] == pytest.approx(budget / 1e6, rel=1e-5)
        assert manifest["recipe"]["quantize"]["bits"] is None
        manifests[label] = manifest
    tight, loose = (manifests[k]["quantization"]["allocation"] for k in ("tight", "preset"))
    assert tight["predicted_kl"] >= loose["predicted_kl"]
    assert len(set(tight["tensors"].values())) > 1  # a mix, not one type everywhere


def test_gguf_budget_check_writes_the_candidate_of_least_measured_kl(wide_model_dir, tmp_path):
    result = _export(wide_model_dir, tmp_path, "--budget-bpw", "3.5", "--budget-check")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    allocation = manifest["quantization"]["allocation"]
    figures = [entry["measured_kl"] for entry in allocation["checked"]]
    assert len(figures) > 1 and allocation["measured_kl"] == figures[0] == min(figures) > 0
    path = tmp_path / manifest["artifact"]["file"]
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors if len(t.shape) >= 2}
    assert written == allocation["tensors"]


def test_budget_bpw_bounds_the_measured_bits_per_weight(wide_model_dir, tmp_path):
    result = _export(wide_model_dir, tmp_path, "--budget-bpw", "4.25")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["artifact"]["bits_per_weight"] <= 4.25


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--budget-mb", "0.5"], "no GGUF of this model fits 0.50 MB"),
        (["--budget-mb", "5", "--stream", "on"], "pass --stream off"),
        (["--budget-mb", "5", "--bits", "4"], "drop --bits"),
        (["--quant-type", "Q4_K_M", "--budget-check"], "add --budget-mb or --budget-bpw"),
    ],
)
def test_budget_errors_are_one_line_and_leave_nothing(wide_model_dir, tmp_path, flags, fragment):
    out = tmp_path / "out"
    result = _export(wide_model_dir, out, *flags)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in " ".join(result.output.split())
    assert not out.exists() or not [p for p in out.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"quantize": {"budget_mb": 90.0}}, "drop --bits and --quant-type"),  # the default bit-width axis
        ({"quantize": {"budget_bpw": 4.5}, "sweep": {"bits": []}}, "use --allocate-mb"),
        ({"quantize": {"budget_mb": 90.0}, "sweep": {"bits": [], "quantizer": ["llama.cpp", "auto"]}}, "one quantizer"),
    ],
)
def test_a_sweep_recipe_with_a_budget_it_cannot_compare_is_refused_before_any_work(tmp_path, changes, fragment):
    from srcr.exporter.recipe import Recipe, SweepStage
    from srcr.exporter.sweep import sweep_plan

    recipe = Recipe().merged({"sweep": SweepStage().model_dump()}).merged(changes)
    with pytest.raises(SrcrError, match=fragment):
        sweep_plan(recipe, tmp_path / "sweep", False)
    assert not (tmp_path / "sweep").exists()


def test_sweep_allocate_mb_refuses_a_bit_width_axis_it_would_replace(wide_model_dir, tmp_path):
    args = ["sweep", "--model", str(wide_model_dir), "--allocate-mb", "9", "--bits", "4", "--out", str(tmp_path / "s")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "drop --bits and --quant-type" in " ".join(result.output.split())


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_sweep_allocate_mb_makes_every_setting_a_file_of_that_size(wide_model_dir, tmp_path, fmt):
    """Structured cuts compete at equal bytes: every configuration is a budget file of the one size, the cut
    model's FFN is narrower (in multiples of 32, a budget's block), and each manifest replays its budget."""
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    out = tmp_path / "sweep"
    args = ["sweep", "--model", str(wide_model_dir), "--format", fmt, "--sparsity", "0", "--allocate-mb", "9",
            "--structures", "none;ffn=0.25,allocation=global", "--calib-samples", "2", "--seq-len", "64",
            "--eval-windows", "2", "--last-word-items", "4", "--new-tokens", "4", "--no-builtin-prompts",
            "--prompts", str(PROMPTS), "--out", str(out), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["records"]) == 2
    assert payload["recommendation"].startswith("Recommended for the highest Sr within 9")
    widths = {}
    for record in payload["records"]:
        manifest = json.loads((out / f"{record['name']}.manifest.json").read_text())
        assert manifest["quantization"]["allocation"]["budget_bytes"] == 9_000_000
        assert manifest["artifact"]["bytes"] <= 9_000_000
        assert manifest["recipe"]["quantize"]["budget_mb"] == 9.0 and manifest["recipe"]["sweep"] is None
        structure = manifest["pruning"]["structure"]
        widths[record["name"]] = [row["ffn"] for row in structure["widths"]] if structure else [512, 512]
        if fmt == "gguf":  # the file itself holds those widths
            reader = gguf.GGUFReader(out / manifest["artifact"]["file"])
            downs = sorted((t.name, int(t.shape[0])) for t in reader.tensors if t.name.endswith("ffn_down.weight"))
            assert [width for _, width in downs] == widths[record["name"]]
    dense, cut = (widths[name] for name in sorted(widths, key=lambda name: "flap" in name))
    assert dense == [512, 512]
    assert sum(cut) < 2 * 512 and all(width % 32 == 0 for width in cut)


def test_the_budget_is_a_recipe_field_the_flag_sets(wide_model_dir):
    result = runner.invoke(app, ["export", "--model", str(wide_model_dir), "--budget-bpw", "4.5", "--print-recipe"])
    assert result.exit_code == 0, result.output
    assert "budget_bpw = 4.5" in result.stdout


def test_gram_error_is_the_relative_output_error_on_the_calibration_inputs():
    from srcr.base.gram import gram_error

    generator = np.random.default_rng(0)
    inputs = generator.normal(size=(500, 16)) @ generator.normal(size=(16, 16))  # correlated columns
    weight = generator.normal(size=(8, 16))
    rounded = weight + generator.normal(scale=0.1, size=weight.shape)
    gram = inputs.T @ inputs / len(inputs)
    expected = np.square((weight - rounded) @ inputs.T).sum() / np.square(weight @ inputs.T).sum()
    assert gram_error(weight, rounded, gram) == pytest.approx(expected, rel=1e-9)
    importance = generator.uniform(0.5, 2.0, size=16)  # a diagonal Gram matrix is the importance matrix
    assert gram_error(weight, rounded, np.diag(importance)) == pytest.approx(
        relative_error(weight, rounded, importance), rel=1e-9
    )


def test_gptq_is_offered_within_one_frontier_step_of_the_first_choice():
    from srcr.targets.gguf.budget import near_bytes

    options = [Option("a", 10, 5.0), Option("b", 20, 3.0), Option("dominated", 25, 4.0), Option("c", 30, 1.0)]
    assert near_bytes(options, options[1]) == (10, 30)
    assert near_bytes(options, options[0]) == (10, 20)
    assert near_bytes(options, options[3]) == (20, 30)


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--quant-type", "Q4_K_M", "--quantizer", "auto"], "add --budget-mb or --budget-bpw"),
        (["--budget-bpw", "4", "--quantizer", "auto", "--sparsity", "0.5"], "drop --sparsity"),
    ],
)
def test_per_tensor_gptq_is_refused_where_it_does_not_apply(wide_model_dir, tmp_path, flags, fragment):
    result = _export(wide_model_dir, tmp_path / "out", *flags)
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.output.split())


def test_quantizer_auto_writes_the_gptq_codes_it_chose_and_fits(wide_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    result = _export(wide_model_dir, tmp_path, "--budget-bpw", "4.5", "--quantizer", "auto")
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    tensors = manifest["quantization"]["allocation"]["tensors"]
    chosen = {name: label.removesuffix("+gptq") for name, label in tensors.items() if label.endswith("+gptq")}
    assert manifest["quantization"]["quantizer"] == "auto"
    assert manifest["quantization"]["gptq_tensors"] == len(chosen) > 0
    path = tmp_path / manifest["artifact"]["file"]
    assert path.stat().st_size <= manifest["quantization"]["allocation"]["budget_bytes"]
    reader = gguf.GGUFReader(path)
    written = {t.name: t for t in reader.tensors if len(t.shape) >= 2}
    assert {name: t.tensor_type.name for name, t in written.items()} == {
        name: label.removesuffix("+gptq") for name, label in tensors.items()
    }
    # A GPTQ matrix went through as srcr wrote it: not what llama.cpp's rounding of the weight gives.
    model = AutoModelForCausalLM.from_pretrained(wide_model_dir, torch_dtype=torch.float32)
    name = next(n for n in chosen if n.endswith("ffn_down.weight"))  # never row-permuted by the converter
    weight = model.get_parameter(f"model.layers.{name.split('.')[1]}.mlp.down_proj.weight").detach().numpy()
    tensor = written[name]
    decoded = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(weight.shape)
    assert relative_error(weight, decoded, None) < 0.05
    assert not np.array_equal(decoded, roundtrip(weight, chosen[name], None))


def test_quantizer_auto_with_gram_matrices_on_disk_writes_the_same_file(wide_model_dir, tmp_path, monkeypatch):
    """When memory is short the Gram matrices go to memory-mapped files beside the output: the same bytes
    come out, and the scratch folder is gone afterwards."""
    from srcr.exporter import hessians

    flags = ("--budget-bpw", "4.5", "--quantizer", "auto")
    in_memory = _export(wide_model_dir, tmp_path / "memory", *flags)
    assert in_memory.exit_code == 0, in_memory.output
    mapped, real = [], hessians._mapped
    monkeypatch.setattr(hessians, "MEMORY_SHARE", 0.0)
    monkeypatch.setattr(hessians, "_mapped", lambda gram, path: mapped.append(path) or real(gram, path))
    on_disk = _export(wide_model_dir, tmp_path / "disk", *flags)
    assert on_disk.exit_code == 0, on_disk.output
    assert len(mapped) == 2 * 4  # per layer: q/k/v's input, o_proj's, gate/up's, down_proj's
    assert all(path.parent.parent == tmp_path / "disk" for path in mapped)
    first, second = json.loads(in_memory.stdout), json.loads(on_disk.stdout)
    assert second["quantization"]["gptq_tensors"] > 0
    assert second["artifact"]["sha256"] == first["artifact"]["sha256"]
    assert sorted(entry.name for entry in (tmp_path / "disk").iterdir()) == sorted(
        entry.name for entry in (tmp_path / "memory").iterdir()
    )


def test_quantizer_auto_is_refused_before_calibration_when_the_grams_fit_nowhere(wide_model_dir, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    from srcr.exporter import hessians, pipeline

    monkeypatch.setattr(hessians, "MEMORY_SHARE", 0.0)
    monkeypatch.setattr(hessians, "_free_disk", lambda folder: hessians.DISK_RESERVE)
    monkeypatch.setattr(pipeline, "load_stage", lambda *args: pytest.fail("the weights were loaded first"))
    result = _export(wide_model_dir, tmp_path / "out", "--budget-bpw", "4.5", "--quantizer", "auto")
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "free disk space there" in message and "--quantizer llama.cpp" in message
    assert not (tmp_path / "out").exists()
