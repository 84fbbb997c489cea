"""Model, calibration and output-path inputs: clear errors, nothing partial left behind."""

from __future__ import annotations

import json

import pytest
import torch

from srcr.base.errors import SrcrError
from srcr.base.files import atomic_path, write_json
from srcr.exporter.calibration import calibration_text, load_calibration, read_text
from srcr.exporter.models import load_model


def test_missing_model_path_names_the_fix(tmp_path):
    with pytest.raises(SrcrError, match="--model PATH"):
        load_model(str(tmp_path / "nope"))


def test_hub_id_offline_fails_fast_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SrcrError, match="from the Hugging Face Hub.*--model PATH"):
        load_model("someone/some-model")


def test_folder_that_is_not_a_causal_lm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    with pytest.raises(SrcrError, match="not a causal language model"):
        load_model(str(tmp_path))


def test_pickled_weights_are_refused_without_opt_in(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SrcrError, match="--allow-pickle"):
        load_model(str(tmp_path))


def test_tiny_model_folder_loads(tiny_llama_dir):
    loaded = load_model(str(tiny_llama_dir))
    assert loaded.architecture == "LlamaForCausalLM"
    assert loaded.n_params == sum(p.numel() for p in loaded.model.parameters())
    assert len(loaded.weights_sha256) == 64


def test_default_calibration_is_capped_by_the_corpus(smollm_tokenizer):
    calibration = load_calibration(smollm_tokenizer, calibration_text(None, None), None, None, seed=0)
    assert calibration.capped
    assert calibration.seq_len == 2048
    assert calibration.n_samples * 2048 <= calibration.corpus_tokens
    assert tuple(calibration.input_ids.shape) == (calibration.n_samples, 2048)
    assert calibration.source.endswith("lee_background.cor")


def test_calibration_windows_are_distinct_and_seeded(smollm_tokenizer):
    first = load_calibration(smollm_tokenizer, calibration_text(None, None), 8, 128, seed=1).input_ids
    again = load_calibration(smollm_tokenizer, calibration_text(None, None), 8, 128, seed=1).input_ids
    assert torch.equal(first, again)
    assert len({tuple(row.tolist()) for row in first}) == 8


def test_explicit_request_beyond_the_corpus_is_refused(tmp_path, smollm_tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("A short calibration text. " * 20)
    with pytest.raises(SrcrError, match="fewer --calib-samples"):
        load_calibration(smollm_tokenizer, read_text(short), 50, 64, seed=0)
    with pytest.raises(SrcrError, match="smaller --seq-len"):
        load_calibration(smollm_tokenizer, read_text(short), 1, 4096, seed=0)


def test_jsonl_calibration_reads_text_fields(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "first document"}\n{"text": "second document"}\n')
    assert read_text(path).text == "first document\n\nsecond document"
    path.write_text('{"body": "no text field"}\n')
    with pytest.raises(SrcrError, match="`text` field"):
        read_text(path)


def test_atomic_path_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    final = tmp_path / "artifact.bin"
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_json(final, {"a": 1})
    with pytest.raises(SrcrError, match="--overwrite"):
        write_json(final, {"a": 2})
    write_json(final, {"a": 3}, overwrite=True)
    assert json.loads(final.read_text()) == {"a": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["artifact.bin"]
