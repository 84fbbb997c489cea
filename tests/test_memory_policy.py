"""Host memory: what `--stream auto` keeps in memory, and the GGUF writer holding one tensor at a time."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import gguf
import pytest
import torch
from conftest import make_tiny_llama
from transformers import LlamaConfig

from srcr.base.weights import ModuleTensors
from srcr.exporter import streaming
from srcr.exporter.models import ModelSource
from srcr.targets.gguf.convert import convert_to_gguf

GIB = 1 << 30
GB = 10**9
SMOLLM2_135M = {
    "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "tie_word_embeddings": True, "dtype": "float32",
}  # fmt: skip
LLAMA_1B_WIDTHS = {
    "vocab_size": 49152, "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
    "num_key_value_heads": 8, "tie_word_embeddings": True, "dtype": "bfloat16",
}  # fmt: skip


def _source(tmp_path: Path, checkpoint_bytes: int, **config) -> ModelSource:
    """A source whose (sparse) weight file has `checkpoint_bytes`: the policy reads sizes and the config only."""
    weights = tmp_path / "model.safetensors"
    with weights.open("wb") as handle:
        handle.truncate(checkpoint_bytes)
    return ModelSource(
        folder=tmp_path,
        label="fake",
        config=LlamaConfig(**config),
        architecture="LlamaForCausalLM",
        weight_files=[weights],
    )


def _available(monkeypatch, available_bytes: float) -> None:
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=int(available_bytes)))


def test_the_embedded_default_stays_in_memory(tmp_path, monkeypatch):
    _available(monkeypatch, 22 * GIB)
    source = _source(tmp_path, int(0.54 * GB), **SMOLLM2_135M)
    assert streaming.in_memory_peak(source) < 0.6 * GIB
    assert streaming.stream_fits(source)


def test_a_1b_bfloat16_model_streams_even_with_memory_to_spare(tmp_path, monkeypatch):
    """The issue's model: 2.4 GB of weights on a 23 GB machine; the old rule (under half the free memory)
    kept it in memory, where it peaked at 3 GiB and more above the baseline."""
    _available(monkeypatch, 22 * GIB)
    source = _source(tmp_path, int(2.39 * GB), num_hidden_layers=18, **LLAMA_1B_WIDTHS)
    assert not streaming.stream_fits(source)


def test_the_float32_layer_and_its_hessians_count(tmp_path, monkeypatch):
    """0.53 GiB of weights alone would fit the headroom; a Llama-3.2-1B layer pruned in float32 (0.23 GiB)
    and the Hessian and inverse of its 8192-wide down_proj (0.5 GiB) do not."""
    _available(monkeypatch, 22 * GIB)
    source = _source(tmp_path, int(0.57 * GB), num_hidden_layers=3, **LLAMA_1B_WIDTHS)
    layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048  # q, o; k, v; MLP; two norms
    assert streaming.in_memory_peak(source) == int(0.57 * GB) + 4 * layer + 2 * 4 * 8192**2
    assert not streaming.stream_fits(source)


@pytest.mark.parametrize(("available_gib", "fits"), [(22, True), (1.2, True), (1.0, False), (0.5, False)])
def test_half_the_available_memory_bounds_a_small_machine(tmp_path, monkeypatch, available_gib, fits):
    _available(monkeypatch, available_gib * GIB)
    source = _source(tmp_path, int(0.54 * GB), **SMOLLM2_135M)  # about 0.53 GiB in memory
    assert streaming.stream_fits(source) is fits


def test_the_headroom_is_a_fixed_gibibyte(tmp_path, monkeypatch):
    _available(monkeypatch, 1000 * GIB)  # a large machine does not raise it
    config = {**SMOLLM2_135M, "num_hidden_layers": 2}
    work = streaming.in_memory_peak(_source(tmp_path, 0, **config))
    assert streaming.stream_fits(_source(tmp_path, streaming.IN_MEMORY_HEADROOM - work, **config))
    assert not streaming.stream_fits(_source(tmp_path, streaming.IN_MEMORY_HEADROOM - work + 1, **config))


def _big_layered_llama(tokenizer):
    # 24 layers of 0.84M weights against a 6.3M-weight embedding: no tensor is over a quarter of the model.
    return make_tiny_llama(
        tokenizer, num_hidden_layers=24, hidden_size=128, intermediate_size=2048, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip


def test_conversion_reads_each_tensor_when_it_writes_it(smollm_tokenizer, tmp_path, monkeypatch):
    """The writer asks its source for a tensor only when that tensor's turn comes, and keeps none."""
    model = make_tiny_llama(smollm_tokenizer, num_hidden_layers=3, tie_word_embeddings=False)
    events: list[str] = []

    class Recording(ModuleTensors):
        def get(self, name):
            events.append("read")
            return super().get(name)

    original = gguf.GGUFWriter.write_tensor_data

    def write(self, tensor, *args, **kwargs):
        events.append("write")
        return original(self, tensor, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write)
    convert_to_gguf(model, smollm_tokenizer, tmp_path / "m.gguf", "F16", weights=Recording(model))
    count = len(model.state_dict())
    assert events == ["read", "write"] * count


def test_conversion_holds_one_tensor_not_a_second_copy_of_the_model(smollm_tokenizer, tmp_path, monkeypatch):
    """Peak of the arrays conversion makes (numpy's allocations, which tracemalloc sees) while it writes the
    tensors: about the largest tensor, not the model's size in the file's dtype."""
    model = _big_layered_llama(smollm_tokenizer)
    stored = {name: tensor.numel() * 2 for name, tensor in model.state_dict().items() if tensor.dim() >= 2}
    largest, total = max(stored.values()), sum(stored.values())
    assert total > 4 * largest  # a second copy of the model would be well over the bound below
    measured: dict[str, int] = {}
    start, close = gguf.GGUFWriter.write_ti_data_to_file, gguf.GGUFWriter.close

    def tensors_start(self, *args, **kwargs):
        result = start(self, *args, **kwargs)
        tracemalloc.reset_peak()
        measured["before"] = tracemalloc.get_traced_memory()[0]
        return result

    def closing(self, *args, **kwargs):
        measured.setdefault("peak", tracemalloc.get_traced_memory()[1])
        return close(self, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFWriter, "write_ti_data_to_file", tensors_start)
    monkeypatch.setattr(gguf.GGUFWriter, "close", closing)
    tracemalloc.start()
    try:
        with torch.no_grad():
            convert_to_gguf(model, smollm_tokenizer, tmp_path / "m.gguf", "F16")
    finally:
        tracemalloc.stop()
    growth = measured["peak"] - measured["before"]
    assert largest / 2 < growth < 2 * largest, f"{growth / 1e6:.1f} MB for a largest tensor of {largest / 1e6:.1f} MB"


def test_a_ray_task_declares_the_memory_the_policy_estimates(tmp_path):
    """An 8B-wide layer's float32 copy and its down_proj Hessians come on top of the weights held (none when
    streamed), plus 2 GiB; a CUDA sweep's task asks for a GPU."""
    from srcr.exporter.distributed import task_resources

    config = {**LLAMA_1B_WIDTHS, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 2}
    source = _source(tmp_path, 10**9, **config)
    layer = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    work = 4 * layer + 2 * 4 * 14336**2
    in_memory = task_resources(SimpleNamespace(source=source, stream=False, device="cpu"))
    streamed = task_resources(SimpleNamespace(source=source, stream=True, device="cuda"))
    assert in_memory == {"num_cpus": 1, "num_gpus": 0, "memory": 10**9 + work + 2 * GIB}
    assert streamed == {"num_cpus": 1, "num_gpus": 1, "memory": work + 2 * GIB}
