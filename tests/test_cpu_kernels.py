"""The runtimes' CPU kernels on the batches srcr really runs: 400-token windows on 2 threads.

On Xeons with AMX, llama.cpp's AMX buffer type crashed (SIGSEGV) here for Q8_0 and Q4_0 weights:
a perplexity window is one ~400-token batch, and 64 tokens or 1 thread did not crash. The runtime
now keeps that buffer type out whenever llama.cpp's CPU backend offers it (docs/gguf.md); these
tests run the crashing case on whatever CPU CI has, and the decision itself on every CPU kind.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_gguf_helpers import sentencepiece_style_tokenizer, tiny_llama

pytest.importorskip("llama_cpp")

from srcr.base.errors import SrcrError  # noqa: E402
from srcr.targets.gguf.backends import cpu_extra_buffer_types, decide_cpu_buffers, plan_cpu_buffers  # noqa: E402
from srcr.targets.gguf.convert import convert_to_gguf  # noqa: E402
from srcr.targets.gguf.quantize import quantize_gguf, tensor_type_mix  # noqa: E402
from srcr.targets.gguf.runtime import LlamaCppRuntime  # noqa: E402

BATCH = 400
THREADS = 2


@pytest.fixture(scope="module")
def tokenizer():
    return sentencepiece_style_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    # Rows of 256 and 512 inputs: every quant type applies (and AMX's tile sizes divide them).
    return tiny_llama(tokenizer, hidden=256, intermediate=512)


@pytest.fixture(scope="module")
def batch(tokenizer) -> list[int]:
    rng = np.random.default_rng(0)
    return rng.integers(3, len(tokenizer), BATCH).tolist()


@pytest.fixture(scope="module")
def f32_file(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("kernels") / "f32.gguf"
    convert_to_gguf(model, tokenizer, path, "F32")
    return path


def torch_logprobs(model, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


# Bounds from measurement on this tiny random model (KL to PyTorch: Q8_0 0.0054, Q4_0 0.61), with margin.
@pytest.mark.parametrize(("quant_type", "max_kl"), [("Q8_0", 0.02), ("Q4_0", 1.5)])
def test_a_400_token_batch_on_two_threads_runs_and_stays_close(f32_file, model, batch, tmp_path, quant_type, max_kl):
    path = tmp_path / f"{quant_type}.gguf"
    quantize_gguf(f32_file, path, quant_type, None, pure=True)
    assert set(tensor_type_mix(path)["types"]) == {quant_type}
    runtime = LlamaCppRuntime(path, n_ctx=512, n_threads=THREADS)
    try:
        served = runtime.logprobs(batch).astype(np.float64)
        info = runtime.info()
    finally:
        runtime.close()
    expected = torch_logprobs(model, batch)
    kl = float((np.exp(expected) * (expected - served)).sum(-1).mean())
    assert np.isfinite(served).all() and kl < max_kl, kl
    # The manifest's runtime info says which buffer types llama.cpp offered and whether srcr used them.
    assert info["cpu_extra_buffer_types"] == list(cpu_extra_buffer_types())
    assert info["extra_buffer_types_used"] == ("AMX" not in cpu_extra_buffer_types())
    assert info["n_threads"] == THREADS


def test_repacking_stays_on_where_no_crashing_buffer_type_is_offered(f32_file, batch, tmp_path):
    """With extra buffer types on and off, the same file gives the same logits (up to kernel rounding)."""
    path = tmp_path / "q4_0.gguf"
    quantize_gguf(f32_file, path, "Q4_0", None, pure=True)
    available = cpu_extra_buffer_types()
    results = {}
    for use in (True, False):
        plan = decide_cpu_buffers(available, "on" if use else "off")
        if use and "AMX" in available:
            continue  # the case this whole change exists to avoid
        runtime = LlamaCppRuntime(path, n_ctx=512, n_threads=THREADS, cpu_buffers=plan)
        try:
            results[use] = runtime.logprobs(batch[:128])
        finally:
            runtime.close()
    if len(results) == 2:
        # The repacked kernels round activations their own way; the distributions stay the same.
        on, off = results[True].astype(np.float64), results[False].astype(np.float64)
        kl = float((np.exp(off) * (off - on)).sum(-1).mean())
        assert kl < 1e-3, kl
        assert (on.argmax(-1) == off.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize(
    ("available", "use"),
    [
        (("AMX", "CPU_REPACK"), False),  # a native build on a Xeon with AMX
        (("CPU_REPACK",), True),  # every other x86-64 CPU with AVX2
        ((), True),  # no extra buffer type at all (e.g. a generic build)
    ],
)
def test_extra_buffers_are_off_exactly_when_the_backend_offers_amx(available, use):
    plan = decide_cpu_buffers(available)
    assert plan.use_extra_buffers is use
    assert plan.available == available
    assert ("AMX" in plan.reason) is (not use)


def test_the_override_wins_and_bad_values_are_refused():
    assert decide_cpu_buffers(("AMX", "CPU_REPACK"), "on").use_extra_buffers is True
    assert decide_cpu_buffers(("CPU_REPACK",), "off").use_extra_buffers is False
    assert decide_cpu_buffers(("AMX",), "auto").use_extra_buffers is False
    with pytest.raises(SrcrError, match="SRCR_LLAMA_EXTRA_BUFFERS"):
        decide_cpu_buffers(("CPU_REPACK",), "maybe")


def test_the_plan_comes_from_this_machines_backend(monkeypatch):
    monkeypatch.delenv("SRCR_LLAMA_EXTRA_BUFFERS", raising=False)
    available = cpu_extra_buffer_types()
    assert all(isinstance(name, str) and name for name in available)
    assert plan_cpu_buffers() == decide_cpu_buffers(available)


@pytest.mark.parametrize(("bits", "max_kl"), [(8, 0.01), (4, 0.5)])
def test_onnx_int8_and_int4_kernels_take_a_400_token_batch_on_two_threads(tmp_path, bits, max_kl):
    pytest.importorskip("onnxruntime")
    from srcr.targets.onnx.runtime import OrtRuntime
    from srcr.targets.onnx.target import ONNXTarget

    tokenizer = sentencepiece_style_tokenizer()
    model = tiny_llama(tokenizer, hidden=256, intermediate=512)
    target = ONNXTarget()
    out = tmp_path / f"q{bits}.onnx"
    target.export(model, tokenizer, target.resolve_quant(bits, None, {}), out)
    tokens = np.random.default_rng(1).integers(3, len(tokenizer), BATCH).tolist()
    runtime = OrtRuntime(out, device="cpu", threads=THREADS)
    try:
        served = runtime.logprobs(tokens).astype(np.float64)
        assert runtime.info()["intra_op_threads"] == THREADS
    finally:
        runtime.close()
    expected = torch_logprobs(model, tokens)
    kl = float((np.exp(expected) * (expected - served)).sum(-1).mean())
    assert np.isfinite(served).all() and kl < max_kl, kl
