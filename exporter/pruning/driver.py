"""Layer-by-layer calibration: the plumbing shared by every pruning method.

The calibration tokens go through the embedding once; the hidden states entering decoder layer 0,
and the keyword arguments the model passes each layer, are caught with the layers bypassed.
Then each decoder layer in turn is brought to the device in float32 (by its `LayerHome`: moved
there from memory, or read from disk when the model is streamed), run over the calibration samples
with every nn.Linear hooked to accumulate input statistics, pruned, rounded to the checkpoint's
dtype, run again (now pruned) to make the next layer's inputs, and handed back to its home. Only
one layer and its activations live on the device; hidden states between layers stay float32.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from srcr.base.errors import SrcrError
from srcr.base.grids import BlockCodes, grid
from srcr.base.placement import Placement, record, restore
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.shapes import linear_input_dims
from srcr.exporter.pruning.method import SHARED_INPUT, PruningMethod
from srcr.exporter.pruning.registry import method_class, validate_spec
from srcr.exporter.pruning.spec import LayerSparsity, PruneReport, PruneSpec
from srcr.exporter.pruning.stats import InputStatistics

if TYPE_CHECKING:
    from transformers import PretrainedConfig


class _LayerInputsCaught(Exception):
    """Stops the model's forward once the last decoder layer has been reached."""


class LayerHome(Protocol):
    """Where decoder layers live between their turns on the device."""

    def onload(self, index: int, layer: nn.Module, device: torch.device) -> None:
        """Put layer `index`'s weights on `device` in float32."""
        ...

    def offload(self, index: int, layer: nn.Module) -> None:
        """Take the (pruned) layer back, in its storage dtype."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype weights are stored in between turns: pruned weights are rounded to it."""
        ...


class InMemory:
    """Layers that live in the model in memory: moved to the device and back, each tensor to its own dtype."""

    def __init__(self, model: nn.Module) -> None:
        self.dtype = next(model.parameters()).dtype
        self._placements: dict[int, Placement] = {}

    def onload(self, index: int, layer: nn.Module, device: torch.device) -> None:
        self._placements[index] = record(layer)
        layer.to(device=device, dtype=torch.float32)

    def offload(self, index: int, layer: nn.Module) -> None:
        restore(layer, self._placements.pop(index))


def prune_model(
    model: nn.Module,
    calib_ids: torch.Tensor,
    spec: PruneSpec,
    device: str = "cpu",
    progress: ProgressFn = no_progress,
    home: LayerHome | None = None,
) -> PruneReport:
    """Calibrate and prune every linear of every decoder layer of `model` in place.

    With nothing to prune (sparsity 0, no pattern) the weights are left untouched and only the
    importance matrix is collected. Embeddings, norms and the LM head stay dense. `home` (default:
    the model in memory) says where the layers are kept between their turns on the device.
    """
    validate_spec(spec)
    _check_calibration(calib_ids)
    layers = decoder_layers(model)
    check_prunable(model.config, spec)
    pruning = spec.solves
    # GPTQ needs SparseGPT's Hessian even when nothing is pruned.
    method = method_class("sparsegpt" if spec.grid is not None else spec.method) if pruning else None
    if method is not None and method.grouping != SHARED_INPUT:
        raise NotImplementedError(f"grouping {method.grouping!r} of method {spec.method!r}")
    layer_names = module_names(model, layers)
    target = torch.device(device)
    home = home or InMemory(model)

    start = time.perf_counter()
    per_layer: list[LayerSparsity] = []
    imatrix: dict[str, np.ndarray] = {}
    codes: dict[str, BlockCodes] = {}
    with torch.no_grad(), inference_setup(model):
        inputs, layer_kwargs = capture_layer_inputs(model, layers, calib_ids, target)
        for index, layer in enumerate(layers):
            home.onload(index, layer, target)
            # Unpruned, the calibration pass already computes the next layer's inputs: keep them.
            outputs = None if pruning else torch.empty_like(inputs)
            for group in calibrate_layer(layer, inputs, layer_kwargs[index], spec, method, outputs):
                if group.method is not None:
                    group.method.prune()
                for name, linear in group.linears.items():
                    full_name = f"{layer_names[index]}.{name}"
                    imatrix[f"{full_name}.weight"] = group.statistics.mean_square.cpu().numpy()
                    if group.method is not None and name in group.method.codes:
                        codes[f"{full_name}.weight"] = group.method.codes[name]
                        # On a grid, weights that merely round to zero are not pruned: count the mask.
                        pruned = group.method.pruned[name]
                    else:
                        pruned = linear.weight == 0
                    per_layer.append(_sparsity_row(index, full_name, pruned))
            if outputs is None:
                # The next layer sees this one as it will be deployed: rounded to the stored dtype
                # (GPTQ's grid values are written from its codes, exactly, whatever that dtype).
                if spec.grid is None:
                    round_to(layer, home.dtype)
                inputs = run_layer(layer, inputs, layer_kwargs[index])
            else:
                inputs = outputs
            home.offload(index, layer)
            progress(f"calibrate+prune layer {index + 1}/{len(layers)}", index + 1, len(layers))
        del inputs

    zeros = sum(round(row.sparsity * row.numel) for row in per_layer)
    weights = sum(row.numel for row in per_layer)
    return PruneReport(
        per_layer=per_layer,
        overall_sparsity=zeros / weights if weights else 0.0,
        imatrix=imatrix,
        imatrix_tokens=int(calib_ids.numel()),
        seconds=time.perf_counter() - start,
        codes=codes,
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder stack of a Llama-style causal LM (`model.model.layers`)."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise SrcrError(
            f"cannot prune {type(model).__name__}: pruning needs a decoder stack at model.model.layers "
            "(Llama, Mistral, Qwen2, SmolLM2 and similar); pass such a model or use --sparsity 0"
        )
    return layers


def capture_layer_inputs(
    model: nn.Module, layers: nn.ModuleList, calib_ids: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Hidden states entering decoder layer 0 for every sample [n, seq, hidden] on `device`, and, per
    layer, the keyword arguments the model passes it (rotary cos/sin, mask, positions; one sample's).

    Models that mix attention types (Gemma 3's sliding and full layers, Qwen 2's max_window_layers) give
    each layer the mask and rotary tables of its own type, so each layer's arguments are caught at its
    own call. Meanwhile a stand-in takes each layer's place, records and returns its input, so catching
    them costs no layer compute (nor runs the layers' hooks); the last one stops the forward before the
    norm and the head.
    All samples have the same length and no padding, so the arguments are kept once.
    """
    caught: dict[int, dict[str, Any]] = {}
    hidden_states: list[torch.Tensor] = []
    # The embedding's device: a streamed model's decoder layers are still on the meta device here.
    model_device = model.get_input_embeddings().weight.device
    originals = list(layers)
    for index, layer in enumerate(originals):
        layers[index] = _Recorder(layer, index, index == len(originals) - 1, caught, hidden_states)
    inputs = None
    try:
        for sample in range(calib_ids.shape[0]):
            with suppress(_LayerInputsCaught):
                model(calib_ids[sample : sample + 1].to(model_device), use_cache=False)
            if not hidden_states:
                raise SrcrError(f"{type(model).__name__} never called its first decoder layer; cannot calibrate")
            hidden = hidden_states.pop()
            if inputs is None:
                # float32 whatever the checkpoint's dtype: the layers run in float32 on their turn.
                inputs = torch.empty((calib_ids.shape[0], *hidden.shape[1:]), dtype=torch.float32, device=device)
            inputs[sample] = hidden[0].to(device)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    if len(caught) != len(layers):
        raise SrcrError(f"{type(model).__name__} skipped some decoder layers in its forward; cannot calibrate")
    return inputs, _on_device(caught, len(layers), device)


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` while its inputs are caught; other attributes are the layer's."""

    def __init__(
        self, layer: nn.Module, index: int, last: bool, caught: dict[int, dict[str, Any]], hidden: list
    ) -> None:
        super().__init__()
        # Plain attributes, not submodules: the stand-in owns no parameters.
        object.__setattr__(self, "layer", layer)
        self.index, self.last, self.caught, self.hidden = index, last, caught, hidden

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "layer"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.hidden.append(hidden.detach())
        self.caught.setdefault(self.index, {key: value for key, value in kwargs.items() if key != "hidden_states"})
        if self.last:
            raise _LayerInputsCaught
        return hidden


def _on_device(caught: dict[int, dict[str, Any]], count: int, device: torch.device) -> list[dict[str, Any]]:
    # Layers of one attention type share the same mask and rotary tensors: move each distinct set once.
    moved: dict[tuple, dict[str, Any]] = {}
    per_layer = []
    for index in range(count):
        kwargs = caught[index]
        key = tuple((name, id(value)) for name, value in kwargs.items())
        if key not in moved:
            moved[key] = _to_device(kwargs, device)
        per_layer.append(moved[key])
    return per_layer


class Group:
    """Linears of one decoder layer that read the same input: their statistics, and the method pruning them."""

    def __init__(self, linears: dict[str, nn.Linear], spec: PruneSpec, method: type[PruningMethod] | None) -> None:
        first = next(iter(linears.values()))
        self.linears = linears
        self.statistics = InputStatistics(first.in_features, first.weight.device)
        self.method = method(linears, spec, self.statistics) if method is not None else None

    def add_batch(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, self.statistics.columns).float()
        self.statistics.add(x)
        if self.method is not None:
            self.method.observe(x)


def calibrate_layer(
    layer: nn.Module,
    inputs: torch.Tensor,
    layer_kwargs: dict[str, Any],
    spec: PruneSpec,
    method: type[PruningMethod] | None,
    outputs: torch.Tensor | None = None,
) -> list[Group]:
    """Run the samples through `layer`, feeding each distinct linear input to one group.

    Linears that receive the very same tensor in a forward (same storage, shape and strides)
    form one group; groups are found in the first sample that calls a linear. With `outputs`
    (shaped like `inputs`), the layer's outputs are written there too. `method` None: statistics only.
    """
    linears = {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}
    if not linears:
        raise SrcrError(f"decoder layer {type(layer).__name__} has no nn.Linear to prune")
    seen: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in seen:
                raise SrcrError(f"linear {name} runs twice in one forward; such layers are not supported")
            seen[name] = args[0].detach()

        return hook

    groups: list[Group] = []
    leader_of: dict[str, Group] = {}  # the member whose input feeds the group
    grouped: set[str] = set()
    handles = [module.register_forward_hook(record(name)) for name, module in linears.items()]
    try:
        for sample in range(inputs.shape[0]):
            output = layer(inputs[sample : sample + 1], **layer_kwargs)
            if outputs is not None:
                outputs[sample] = _hidden_states(output)[0]
            fresh = [name for name in linears if name in seen and name not in grouped]
            for members in _same_input(fresh, seen):
                group = Group({name: linears[name] for name in members}, spec, method)
                groups.append(group)
                leader_of[members[0]] = group
                grouped.update(members)
            for leader, group in leader_of.items():
                if leader in seen:
                    group.add_batch(seen[leader])
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    return groups


def _same_input(names: list[str], seen: dict[str, torch.Tensor]) -> list[list[str]]:
    # The captured tensors are all alive here, so equal storage pointers mean the same data.
    by_input: dict[tuple, list[str]] = {}
    for name in names:
        tensor = seen[name]
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        by_input.setdefault(key, []).append(name)
    return list(by_input.values())


def run_layer(layer: nn.Module, inputs: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
    """The layer's output for every sample: the next layer's inputs."""
    outputs = torch.empty_like(inputs)
    for sample in range(inputs.shape[0]):
        outputs[sample] = _hidden_states(layer(inputs[sample : sample + 1], **layer_kwargs))[0]
    return outputs


def _hidden_states(output: Any) -> torch.Tensor:
    # Decoder layers return the hidden states alone or first in a tuple, depending on the version.
    return output[0] if isinstance(output, tuple) else output


def _check_calibration(calib_ids: torch.Tensor) -> None:
    if not isinstance(calib_ids, torch.Tensor) or calib_ids.dim() != 2 or calib_ids.numel() == 0:
        raise SrcrError("calibration ids must be a non-empty [n_samples, seq_len] tensor of token ids")
    if calib_ids.dtype != torch.long:
        raise SrcrError(f"calibration ids are {calib_ids.dtype}; pass token ids as torch.long")


def check_prunable(config: PretrainedConfig, spec: PruneSpec) -> None:
    """The model-dependent limits of a pruning request, from the config alone (before loading weights)."""
    if spec.pattern is not None:
        m = spec.pattern[1]
        for kind, columns in _input_dims(config).items():
            if columns % m:
                raise SrcrError(f"{kind} has {columns} inputs, not a multiple of M={m}; pick an M that divides it")
    if spec.grid is not None:
        span = grid(spec.grid).span
        misfits = {kind: columns for kind, columns in _input_dims(config).items() if columns % span}
        if misfits:
            kind, columns = next(iter(misfits.items()))
            legacy = " a type of 32-weight blocks (Q4_0, Q5_0, Q8_0) or" if span > 32 and not columns % 32 else ""
            raise SrcrError(
                f"{kind} has {columns} inputs, not a multiple of {spec.grid}'s {span}-weight blocks; "
                f"use{legacy} --quantizer llama.cpp for this model"
            )


def _input_dims(config: PretrainedConfig) -> dict[str, int]:
    try:
        return linear_input_dims(config)
    except AttributeError:
        return {}


def _sparsity_row(layer: int, name: str, pruned: torch.Tensor) -> LayerSparsity:
    return LayerSparsity(layer=layer, name=name, sparsity=int(pruned.sum()) / pruned.numel(), numel=pruned.numel())


def module_names(model: nn.Module, layers: nn.ModuleList) -> list[str]:
    names = {id(module): name for name, module in model.named_modules()}
    return [names[id(layer)] for layer in layers]


def round_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Round the module's float32 parameters to `dtype` and back, in place (no-op for float32)."""
    if dtype == torch.float32:
        return
    for parameter in module.parameters():
        parameter.data = parameter.data.to(dtype).to(torch.float32)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to_device(item, device) for item in value)
    if isinstance(value, list):
        return [_to_device(item, device) for item in value]
    if isinstance(value, dict):
        return {key: _to_device(item, device) for key, item in value.items()}
    return value


@contextmanager
def inference_setup(model: nn.Module) -> Iterator[None]:
    """Eval mode and no KV cache for the duration, restored afterwards."""
    training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        yield
    finally:
        model.train(training)
        if use_cache is not None:
            config.use_cache = use_cache
