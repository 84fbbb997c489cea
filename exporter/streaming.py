"""Streaming: a model pruned one decoder layer at a time from its safetensors files, never held whole.

The model is built as a skeleton without weights; only its input embedding is read (calibration's
first step). Each decoder layer is then read from its shard(s) straight onto the device in float32,
calibrated and pruned, rounded to the checkpoint's dtype, written to a pruned safetensors folder and
dropped again. The tensors no layer holds (embeddings, final norm, output head) are copied into that
folder one at a time. The target then converts the folder tensor by tensor, so host memory holds
about one layer, the embedding and the calibration activations, whatever the model's depth.
"""

from __future__ import annotations

import shutil
from typing import TYPE_CHECKING

import torch
from torch import nn

from srcr.base.errors import SrcrError
from srcr.base.memory import map_large_blocks, release_freed
from srcr.base.weights import INDEX_FILE, FolderWriter, SafetensorsFolder
from srcr.exporter.models import HINTS_FILE, ModelSource, storage_dtype
from srcr.exporter.pruning.driver import decoder_layers, module_names

if TYPE_CHECKING:
    from transformers import PreTrainedModel

# Files of a model folder besides its weights that a converter or a loader may read.
_SIDE_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")


def skeleton_on_meta(source: ModelSource) -> PreTrainedModel:
    """The model with every parameter on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            source.config, dtype=storage_dtype(source.config), trust_remote_code=False
        )
    model.tie_weights()  # accelerate's empty parameters come untied
    model.name_or_path = str(source.folder)  # what a model loaded from the folder says
    return model.eval()


def check_streamable(source: ModelSource, model: nn.Module, weights: SafetensorsFolder | None = None) -> None:
    """Every weight `model` (a skeleton will do) has must be in the folder under the model's own name
    (checked before work); `weights`: the folder's index when it has been read already."""
    if any(file.suffix != ".safetensors" for file in source.weight_files):
        raise SrcrError(f"{source.folder} has pickled weights; streaming reads safetensors only: use --no-stream")
    stored = set((weights or SafetensorsFolder(source.folder, source.weight_files)).names())
    tied = _tied_names(model)
    missing = [name for name in model.state_dict() if name not in stored and name not in tied]
    if missing:
        raise SrcrError(
            f"{source.folder} stores its weights under other names than transformers' {type(model).__name__} "
            f"(e.g. no {missing[0]!r}); streaming reads them by name: use --no-stream"
        )


def _tied_names(model: nn.Module) -> set[str]:
    output = model.get_output_embeddings()
    return {f"{module_names(model, [output])[0]}.weight"} if _tied(model) else set()


def _tied(model: nn.Module) -> bool:
    output = model.get_output_embeddings()
    return output is not None and output.weight is model.get_input_embeddings().weight


def materialize(
    module: nn.Module, prefix: str, weights: SafetensorsFolder, device: torch.device, dtype: torch.dtype
) -> None:
    """Read `module`'s parameters and persistent buffers from `weights` onto `device` (floats as `dtype`)."""
    from accelerate.utils import set_module_tensor_to_device

    names = list(module.state_dict(keep_vars=True))
    for name, tensor in weights.read(f"{prefix}.{name}" for name in names):
        local = name.removeprefix(f"{prefix}.")
        target_dtype = dtype if tensor.is_floating_point() else None
        set_module_tensor_to_device(module, local, device, value=tensor, dtype=target_dtype)


def open_streamed(source: ModelSource, weights: SafetensorsFolder) -> PreTrainedModel:
    """The skeleton with its input embedding read from `weights` (the source's folder; on the CPU, in the
    checkpoint's dtype): all that catching the first layer's inputs needs."""
    map_large_blocks()  # a layer's worth of freed memory goes back to the system, not into a heap
    model = skeleton_on_meta(source)
    check_streamable(source, model, weights)
    embedding, output = model.get_input_embeddings(), model.get_output_embeddings()
    tied = _tied(model)
    materialize(
        embedding, module_names(model, [embedding])[0], weights, torch.device("cpu"), storage_dtype(source.config)
    )
    if tied:
        output.weight = embedding.weight  # materializing made a new parameter; the head still shares it
    return model


class FromDisk:
    """`LayerHome` of a streamed model: layers are read from the source folder on their turn, then written
    to the pruned folder (when there is one: a statistics-only pass changes nothing) and dropped."""

    def __init__(self, model: PreTrainedModel, weights: SafetensorsFolder, writer: FolderWriter | None) -> None:
        self.weights, self.writer = weights, writer
        self.dtype = storage_dtype(model.config)
        self.prefixes = module_names(model, list(decoder_layers(model)))

    def onload(self, index: int, layer: nn.Module, device: torch.device) -> None:
        materialize(layer, self.prefixes[index], self.weights, device, torch.float32)

    def offload(self, index: int, layer: nn.Module) -> None:
        if self.writer is not None:
            prefix = self.prefixes[index]
            tensors = {f"{prefix}.{name}": tensor.to(self.dtype) for name, tensor in layer.state_dict().items()}
            self.writer.write(f"model-layer-{index:05d}.safetensors", tensors)
        layer.to("meta")
        release_freed()


def finish_folder(source: ModelSource, weights: SafetensorsFolder, writer: FolderWriter) -> SafetensorsFolder:
    """Copy every tensor no decoder layer holds, one file each, and the folder's side files; write the index."""
    written = set(writer.weight_map)
    for position, name in enumerate(name for name in weights.names() if name not in written):
        writer.write(f"model-other-{position:05d}.safetensors", {name: weights.get(name)})
    for pattern in _SIDE_FILES:
        for file in source.folder.glob(pattern):
            if file.name != INDEX_FILE and file.is_file():
                shutil.copyfile(file, writer.folder / file.name)
    hints = source.folder / HINTS_FILE
    if hints.is_file():
        shutil.copyfile(hints, writer.folder / HINTS_FILE)
    writer.finish()
    return SafetensorsFolder(writer.folder)


# What `--stream auto` lets the in-memory path take above the process's baseline: about what streaming a
# 1B-class model takes anyway (one layer in float32, SparseGPT's largest Hessian and its inverse, the
# embedding; docs/performance.md, "Streaming memory"), so holding the model whole never costs much more.
IN_MEMORY_HEADROOM = 1 << 30


def in_memory_peak(source: ModelSource) -> int:
    """Bytes the in-memory path holds above the baseline, estimated before any weight is read: the weights in
    their own dtype (the checkpoint's size) and the working set of its largest decoder layer, which is
    pruned in float32 (a float32 copy of the layer, and a Hessian and its inverse of its widest input)."""
    weights = sum(file.stat().st_size for file in source.weight_files)
    return weights + layer_work(source)


def layer_work(source: ModelSource) -> int:
    """Bytes of the largest decoder layer's float32 copy and the Hessian and inverse of its widest input."""
    from srcr.exporter.models import skeleton

    try:
        layers = decoder_layers(skeleton(source.config))
    except Exception:  # a layout the pruning driver does not know: the plan refuses it with its own reason
        return 0
    work = 0
    for layer in layers:
        copy = 4 * sum(parameter.numel() for parameter in layer.parameters())
        widest = max((module.in_features for module in layer.modules() if isinstance(module, nn.Linear)), default=0)
        work = max(work, copy + 2 * 4 * widest * widest)
    return work


def stream_fits(source: ModelSource) -> bool:
    """Whether `--stream auto` keeps the model in memory: its estimated in-memory peak (`in_memory_peak`)
    fits both a fixed headroom (`IN_MEMORY_HEADROOM`, 1 GiB) and half the available memory.

    Streaming holds the embedding and one layer whatever the depth, and writes the same file; the in-memory
    path holds every weight besides. So a model is kept whole only when that costs no more than streaming a
    1B-class model costs anyway: the embedded SmolLM2-135M (float32, 0.54 GB) stays in memory, a 1.2B
    bfloat16 Llama (2.4 GB, about 3 GiB in memory) streams on any machine, and on a small machine half its
    available memory is the limit. The caller streams only where the target and settings allow it."""
    import psutil

    peak = in_memory_peak(source)
    return peak <= min(IN_MEMORY_HEADROOM, psutil.virtual_memory().available / 2)
