"""srcr's runtimes registered as lm-evaluation-harness models, and `srcr-lm-eval`, lm-eval's CLI with them.

    srcr-lm-eval --model srcr-gguf --model_args path=out/model.gguf --tasks hellaswag
    srcr-lm-eval --model srcr-onnx --model_args path=out/model.onnx,device=cpu --tasks arc_easy
    srcr-lm-eval --model srcr-hf --model_args path=./my-llama --tasks arc_easy    # the dense model, PyTorch

lm-eval 0.4 finds third-party models only once their module is imported (it has no plugin discovery for
models), so `register()` does that for Python users (`lm_eval.simple_evaluate(model="srcr-gguf", ...)`
after `register()`), and `srcr-lm-eval` is lm-eval's own command line with srcr's models registered
first: every lm-eval flag works as documented there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from srcr.evaluators.harness import require_lm_eval, runtime_lm_class
from srcr.targets.registry import get_target

MODEL_NAMES = {"srcr-gguf": "gguf", "srcr-onnx": "onnx", "srcr-hf": None}


def model_class(name: str) -> type:
    """The lm-eval model class for `name` (srcr-gguf, srcr-onnx or srcr-hf)."""
    fmt = MODEL_NAMES[name]
    runtime_lm = runtime_lm_class()

    class SrcrModel(runtime_lm):
        def __init__(self, path: str, device: str = "auto", max_length: int | None = None, **ignored: Any) -> None:
            runtime = open_runtime(fmt, Path(path), device)
            super().__init__(runtime, bos_id=runtime.info().get("bos_token_id"), max_length=max_length)

        @classmethod
        def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> Any:
            from lm_eval.utils import simple_parse_args_string

            return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

        @classmethod
        def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> Any:
            # lm-eval adds its own --device (default cuda:0) beside model_args; model_args' device wins,
            # and lm-eval's CUDA default means "the GPU if there is one", srcr's auto.
            args = dict(arg_dict)
            device = (additional_config or {}).get("device")
            if "device" not in args and device:
                args["device"] = "auto" if str(device).startswith("cuda") else str(device)
            return cls(**args)

    SrcrModel.__name__ = SrcrModel.__qualname__ = f"Srcr{(fmt or 'hf').upper()}LM"
    return SrcrModel


def open_runtime(fmt: str | None, path: Path, device: str) -> Any:
    if fmt is not None:
        return get_target(fmt).open_runtime(path, device)
    import torch

    from srcr.exporter.models import load_model
    from srcr.targets.torch_runtime import TorchRuntime

    loaded = load_model(str(path))
    where = "cpu" if device == "auto" else device
    # Loaded in the checkpoint's dtype; the dense reference runs in float32 (TorchRuntime's contract).
    return TorchRuntime(loaded.model.to(device=where, dtype=torch.float32), loaded.tokenizer, where)


def register() -> None:
    """Make srcr-gguf, srcr-onnx and srcr-hf known to lm-eval's model registry (once)."""
    require_lm_eval()
    from lm_eval.api.registry import MODEL_REGISTRY, register_model

    for name in MODEL_NAMES:
        if name not in MODEL_REGISTRY:
            register_model(name)(model_class(name))


def main() -> None:
    """`srcr-lm-eval`: lm-eval's command line, with srcr's models registered."""
    register()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
