"""Streaming: layers read from the checkpoint one at a time give the very model the in-memory path gives,
read sharded folders shard by shard, keep the checkpoint's dtype, and hold host memory to about a layer."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from safetensors import safe_open
from typer.testing import CliRunner

from srcr.base.errors import SrcrError
from srcr.base.weights import FolderWriter, SafetensorsFolder
from srcr.exporter.cli import app
from srcr.exporter.models import load_weights, open_source
from srcr.exporter.pruning import PruneSpec, prune_model
from srcr.exporter.streaming import FromDisk, finish_folder, materialize, open_streamed
from srcr.targets.torch_runtime import TorchRuntime

runner = CliRunner()


@pytest.fixture(scope="module")
def bf16_sharded_dir(tmp_path_factory, smollm_tokenizer) -> Path:
    """A 4-layer bfloat16 Llama with an untied head, saved in several shards with an index."""
    folder = tmp_path_factory.mktemp("bf16-sharded")
    model = make_tiny_llama(smollm_tokenizer, seed=3, num_hidden_layers=4, tie_word_embeddings=False)
    with torch.no_grad():  # sharpened: random weights this small give near-uniform outputs
        for parameter in model.parameters():
            parameter.mul_(4.0)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True, max_shard_size="2MB")
    smollm_tokenizer.save_pretrained(folder)
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


def _calibration(tokenizer, samples: int = 4, length: int = 48) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (samples, length), generator=generator)


def _stream_prune(source, spec, ids, folder: Path) -> tuple[SafetensorsFolder, object]:
    weights = SafetensorsFolder(source.folder, source.weight_files)
    model = open_streamed(source, weights)
    writer = FolderWriter(folder)
    report = prune_model(model, ids, spec, home=FromDisk(model, weights, writer))
    return finish_folder(source, weights, writer), report


@pytest.mark.parametrize(
    "spec", [PruneSpec(method="sparsegpt", sparsity=0.5), PruneSpec(method="wanda", sparsity=0.0, pattern=(2, 4))]
)
def test_streamed_pruning_gives_the_in_memory_weights(bf16_sharded_dir, smollm_tokenizer, tmp_path, spec):
    source = open_source(str(bf16_sharded_dir))
    ids = _calibration(smollm_tokenizer)
    in_memory = load_weights(source)
    assert in_memory.model.dtype == torch.bfloat16  # loaded in the checkpoint's dtype, not float32
    report = prune_model(in_memory.model, ids, spec)
    folder, streamed_report = _stream_prune(source, spec, ids, tmp_path / "pruned")

    expected = in_memory.model.state_dict()
    assert sorted(folder.names()) == sorted(expected)  # untied head: every tensor, layers and the rest
    for name in folder.names():
        streamed = folder.get(name)
        assert streamed.dtype == expected[name].dtype == torch.bfloat16, name
        assert torch.equal(streamed, expected[name]), name
    assert streamed_report.overall_sparsity == report.overall_sparsity > 0.4
    assert report.imatrix.keys() == streamed_report.imatrix.keys()
    for name, values in report.imatrix.items():
        np.testing.assert_array_equal(values, streamed_report.imatrix[name])


def test_sharded_folder_is_read_shard_by_shard(bf16_sharded_dir, monkeypatch):
    index = json.loads((bf16_sharded_dir / "model.safetensors.index.json").read_text())["weight_map"]
    source = open_source(str(bf16_sharded_dir))
    weights = SafetensorsFolder(source.folder, source.weight_files)
    model = open_streamed(source, weights)
    opened: list[str] = []

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path).name)
        return safe_open(path, *args, **kwargs)

    monkeypatch.setattr("safetensors.safe_open", recording_open)
    materialize(model.model.layers[2], "model.layers.2", weights, torch.device("cpu"), torch.float32)
    holding = {file for name, file in index.items() if name.startswith("model.layers.2.")}
    assert sorted(opened) == sorted(holding)  # each shard holding the layer once, no other shard
    assert len(holding) < len(set(index.values()))
    assert model.model.layers[2].mlp.down_proj.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.down_proj.weight.device.type == "meta"  # the others stay unread


def test_a_damaged_index_is_refused(tmp_path, bf16_sharded_dir):
    for file in bf16_sharded_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    index_file = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    name = next(iter(index["weight_map"]))
    for bad in ("../outside.safetensors", "sub/model.safetensors", "missing.safetensors", 7):
        index["weight_map"][name] = bad
        index_file.write_text(json.dumps(index))
        with pytest.raises(SrcrError, match="index|missing"):
            SafetensorsFolder(tmp_path)


def test_borrowing_for_the_reference_gives_back_every_tensor_as_it_was(bf16_sharded_dir):
    model = load_weights(open_source(str(bf16_sharded_dir))).model
    before = {
        name: (tensor.dtype, tensor.clone()) for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    assert before["model.rotary_emb.inv_freq"][0] == torch.float32  # transformers keeps rotary tables in float32
    with TorchRuntime.borrowing(model, None, "cpu") as runtime:
        assert runtime.model.model.layers[0].mlp.up_proj.weight.dtype == torch.float32
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        assert tensor.dtype == before[name][0], name
        assert torch.equal(tensor, before[name][1]), name


def _export(*args: str) -> dict:
    result = runner.invoke(app, ["export", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_streamed_export_is_the_in_memory_export(bf16_sharded_dir, tmp_path):
    common = ["--model", str(bf16_sharded_dir), "--sparsity", "0.5", "--bits", "4", "--no-eval",
              "--calib-samples", "4", "--seq-len", "64"]  # fmt: skip
    streamed = _export(*common, "--stream", "on", "--out", str(tmp_path / "on"))
    in_memory = _export(*common, "--stream", "off", "--out", str(tmp_path / "off"))
    assert streamed["pruning"]["streamed"] and not in_memory["pruning"]["streamed"]
    assert streamed["artifact"]["sha256"] == in_memory["artifact"]["sha256"]
    assert streamed["pruning"]["per_layer"] == in_memory["pruning"]["per_layer"]
    assert streamed["source_model"]["dtype"] == "bfloat16"
    left = sorted(path.name for path in (tmp_path / "on").iterdir())  # the pruned folder is gone
    assert left == [streamed["artifact"]["file"], f"{streamed['name']}.manifest.json"]


def test_bf16_checkpoint_keeps_bf16_in_the_16_bit_export(bf16_sharded_dir, tmp_path):
    manifest = _export("--model", str(bf16_sharded_dir), "--bits", "16", "--no-eval", "--stream", "on",
                       "--calib-samples", "2", "--seq-len", "32", "--out", str(tmp_path))  # fmt: skip
    assert manifest["quantization"]["type"] == "BF16"
    reader = gguf.GGUFReader(tmp_path / manifest["artifact"]["file"])
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert {tensor.tensor_type.name for tensor in tensors.values() if len(tensor.shape) >= 2} == {"BF16"}
    # Oracle: the checkpoint's own bfloat16 bits, read with safetensors (llama's q rows are permuted: use v).
    folder = SafetensorsFolder(bf16_sharded_dir)
    expected = folder.get("model.layers.1.self_attn.v_proj.weight").view(torch.int16).numpy()
    written = np.asarray(tensors["blk.1.attn_v.weight"].data).view(np.int16).reshape(expected.shape)
    np.testing.assert_array_equal(written, expected)


@pytest.mark.parametrize(
    ("flags", "reason"),
    [
        (["--format", "onnx"], "traces the whole model"),
        (["--ffn-ratio", "0.25", "--bits", "8"], "structured pruning"),
        (["--quantizer", "gptq"], "codes of every layer"),
    ],
)
def test_stream_on_says_why_it_cannot(bf16_sharded_dir, tmp_path, flags, reason):
    result = runner.invoke(
        app, ["export", "--model", str(bf16_sharded_dir), "--stream", "on", "--no-eval", "--out", str(tmp_path), *flags]
    )
    assert result.exit_code != 0
    assert reason in " ".join(result.output.split())
    assert not any(tmp_path.iterdir())


PEAK_SCRIPT = textwrap.dedent(
    """
    import sys, threading, psutil, torch
    from srcr.base.weights import FolderWriter, SafetensorsFolder
    from srcr.exporter.models import open_source
    from srcr.exporter.pruning import PruneSpec, prune_model
    from srcr.exporter.streaming import FromDisk, finish_folder, open_streamed

    torch.set_num_threads(1)
    source = open_source(sys.argv[1])
    weights = SafetensorsFolder(source.folder, source.weight_files)
    model = open_streamed(source, weights)
    ids = torch.randint(0, 1000, (2, 32), generator=torch.Generator().manual_seed(0))
    process, peak, done = psutil.Process(), [0], threading.Event()
    baseline = process.memory_info().rss

    def sample():  # the kernel's own high-water mark would include what loading the libraries took
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    writer = FolderWriter(sys.argv[2])
    prune_model(model, ids, PruneSpec(method="sparsegpt", sparsity=0.5), home=FromDisk(model, weights, writer))
    finish_folder(source, weights, writer)
    done.set()
    thread.join()
    print(peak[0] - baseline)
    """
)


def test_streaming_holds_about_one_layer_not_the_model(smollm_tokenizer, tmp_path):
    """32 layers of 8 MB (bfloat16): a whole-model load alone would add 268 MB; streaming stays under half
    (one layer in float32, its bfloat16 copy on the way out, and SparseGPT's largest Hessian and inverse)."""
    model = make_tiny_llama(
        smollm_tokenizer, num_hidden_layers=32, hidden_size=512, intermediate_size=2048, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=1024,
    )  # fmt: skip
    model.to(torch.bfloat16).save_pretrained(tmp_path / "model", safe_serialization=True, max_shard_size="60MB")
    smollm_tokenizer.save_pretrained(tmp_path / "model")
    layers_bytes = sum(p.numel() * 2 for p in model.model.layers.parameters())
    del model
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "model"), str(tmp_path / "pruned")],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1])
    assert layers_bytes > 260e6
    assert growth < layers_bytes / 2, f"peak grew {growth / 1e6:.0f} MB for {layers_bytes / 1e6:.0f} MB of layers"
    assert len(SafetensorsFolder(tmp_path / "pruned").names()) == len(SafetensorsFolder(tmp_path / "model").names())


@pytest.mark.slow
def test_smollm2_streamed_export_is_byte_identical(tmp_path):
    """The embedded SmolLM2 (float32, tied embeddings) streamed and in memory: the same GGUF, byte for byte."""
    common = ["--sparsity", "0.5", "--bits", "4", "--no-eval", "--calib-samples", "8", "--seq-len", "256"]
    streamed = _export(*common, "--stream", "on", "--out", str(tmp_path / "on"))
    in_memory = _export(*common, "--stream", "off", "--out", str(tmp_path / "off"))
    assert streamed["source_model"]["dtype"] == "float32"
    assert streamed["pruning"]["streamed"] and not in_memory["pruning"]["streamed"]
    assert streamed["artifact"]["sha256"] == in_memory["artifact"]["sha256"]
    assert _sha256(tmp_path / "on" / streamed["artifact"]["file"]) == streamed["artifact"]["sha256"]
    assert streamed["pruning"]["per_layer"] == in_memory["pruning"]["per_layer"]


@pytest.mark.parametrize(
    ("fmt", "fits", "streams"), [("gguf", False, True), ("gguf", True, False), ("onnx", False, False)]
)
def test_stream_auto_streams_what_does_not_fit_and_can_stream(
    bf16_sharded_dir, tmp_path, monkeypatch, fmt, fits, streams
):
    from srcr.exporter import pipeline
    from srcr.exporter.recipe import Recipe

    monkeypatch.setattr(pipeline, "stream_fits", lambda source: fits)
    recipe = Recipe.model_validate(
        {"model": {"source": str(bf16_sharded_dir)}, "export": {"format": fmt}, "evaluate": {"enabled": False}}
    )
    setting = pipeline.Setting(pipeline.prune_spec_for(0.5, None, recipe.prune))
    plan = pipeline.make_plan(recipe, tmp_path, False, [8], None, [setting])
    assert plan.stream is streams
    assert plan.reference == ("artifact" if streams else "torch")


def test_streamed_sweep_writes_the_in_memory_sweeps_files(bf16_sharded_dir, tmp_path):
    """Both settings of a streamed sweep (the statistics-only pass reads layers and writes none) give the
    files of the in-memory sweep, which prunes the dense model itself and then a fresh copy."""
    prompts = str(Path(__file__).parent / "data" / "prompts_small.jsonl")
    common = ["sweep", "--model", str(bf16_sharded_dir), "--sparsity", "0,0.5", "--bits", "8", "--reference",
              "artifact", "--calib-samples", "4", "--seq-len", "64", "--eval-windows", "1", "--last-word-items", "4",
              "--new-tokens", "4", "--no-builtin-prompts", "--prompts", prompts, "--json"]  # fmt: skip
    files = {}
    for stream in ("on", "off"):
        result = runner.invoke(app, [*common, "--stream", stream, "--out", str(tmp_path / stream)])
        assert result.exit_code == 0, result.output
        files[stream] = {path.name: _sha256(path) for path in (tmp_path / stream).glob("*.gguf")}
        assert not [path for path in (tmp_path / stream).iterdir() if path.name.startswith(".")]
    assert len(files["on"]) == 2 and files["on"] == files["off"]


def test_the_artifact_reference_prompts_and_scores_as_the_torch_reference(bf16_sharded_dir, tmp_path):
    """llama.cpp renders no chat template: the artifact reference must still prompt through the model's own
    (else its semantic figure is another evaluation), and see the very windows the torch reference sees."""
    from srcr.base.progress import no_progress
    from srcr.exporter.evaluation import build_reference, build_reference_from_artifact, eval_inputs
    from srcr.exporter.pipeline import export_hints
    from srcr.exporter.recipe import EvaluateStage
    from srcr.targets.registry import get_target

    loaded = load_weights(open_source(str(bf16_sharded_dir)))
    prompts = Path(__file__).parent / "data" / "prompts_small.jsonl"
    inputs = eval_inputs(
        EvaluateStage(windows=1, last_word_items=3, new_tokens=3, builtin_prompts=False, prompts=str(prompts))
    )
    target = get_target("gguf")
    torch_pack = build_reference(loaded, inputs, "cpu", no_progress)
    artifact_pack = build_reference_from_artifact(
        target, target.reference_spec("bfloat16"), loaded, inputs, tmp_path, export_hints(loaded, "ref"), no_progress
    )
    assert torch_pack.semantic.prompt_format == artifact_pack.semantic.prompt_format == "chat"
    assert torch_pack.semantic.prompt_tokens == artifact_pack.semantic.prompt_tokens
    np.testing.assert_array_equal(torch_pack.distribution.windows, artifact_pack.distribution.windows)
    assert artifact_pack.meta["base_runtime"]["runtime"] == "llama.cpp"
    assert artifact_pack.meta["base_runtime"]["artifact_type"] == "BF16"
    assert not any(tmp_path.iterdir())  # the unrounded file is gone
