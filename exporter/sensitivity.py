"""How much each weight matrix's rounding costs the model's output: measured, one matrix at a time.

For a byte budget, the allocator needs to know what a given error in one tensor does to the whole
model's predictions. For every weight matrix (each decoder linear, the token embedding and an untied
head) this rounds that matrix alone with two probes (symmetric 4-bit and 2-bit blocks of 32, stand-ins
for any block quantizer), runs the model from that layer on, and records the mean KL(model || probed
model) over the calibration tokens against the probe's relative error (srcr.base.allocation.relative_error,
weighted by the importance matrix). The two points give the tensor's KL curve (srcr.base.allocation.KlCurve:
linear to the 4-bit probe, a power law beyond it); a target reads it at each candidate type's own relative
error to predict its cost, with the usual assumption that the errors of different tensors add up.

Each layer's inputs are cached from one clean pass, so probing a matrix of layer l runs layers l..L
and the head only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from srcr.base.allocation import KlCurve
from srcr.base.errors import SrcrError
from srcr.base.gram import output_error
from srcr.base.placement import placed
from srcr.base.progress import ProgressFn, no_progress
from srcr.exporter.pruning.driver import capture_layer_inputs, decoder_layers, inference_setup, module_names, run_layer

# Calibration tokens the probes are scored on: the first windows of the calibration set, cut to this.
DEFAULT_TOKENS = 512
# Tokens a budget's candidate allocations are measured on (--budget-check): candidates differ by a few
# percent, and on 512 tokens the ranking of two of them flipped between draws (docs/results.md).
CHECK_TOKENS = 4096
PROBE_BLOCK = 32
# The probes: 4 bits anchors the small-error (linear) range; 2 bits measures how fast the KL grows beyond.
PROBE_BITS, COARSE_PROBE_BITS = 4, 2


@dataclass(frozen=True)
class Sensitivity:
    kl_per_error: float  # mean KL per unit of relative (importance-weighted) error, at the 4-bit probe
    probe_kl: float
    probe_error: float
    coarse_kl: float  # the same for the 2-bit probe
    coarse_error: float

    @property
    def curve(self) -> KlCurve:
        """Predicted mean KL at any relative error: linear to the 4-bit probe, a power law beyond."""
        return KlCurve.through((self.probe_error, self.probe_kl), (self.coarse_error, self.coarse_kl))


def probe(weight: torch.Tensor, bits: int = PROBE_BITS) -> torch.Tensor:
    """Symmetric rounding to `bits` in blocks of 32 along each row (absmax scale): what any block type of
    that width does to a matrix, in kind. Rows whose width is not a multiple of 32 get one block per row."""
    rows, columns = weight.shape
    block = PROBE_BLOCK if columns % PROBE_BLOCK == 0 else columns
    blocks = weight.reshape(rows, columns // block, block)
    top = 2 ** (bits - 1) - 1
    scale = blocks.abs().amax(dim=-1, keepdim=True) / top
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.clamp(torch.round(blocks / scale), -top - 1, top) * scale).reshape(rows, columns)


def _head(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    base = getattr(model, "model", None)
    norm, head = getattr(base, "norm", None), model.get_output_embeddings()
    if norm is None or head is None:
        raise SrcrError(f"--budget needs the final norm and head of {type(model).__name__}; use --bits or --quant-type")
    return norm, head, getattr(model.config, "final_logit_softcapping", None)


def _log_probs(norm: nn.Module, head: nn.Module, softcap: float | None, hidden: torch.Tensor) -> torch.Tensor:
    logits = head(norm(hidden)).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1)


def measure_sensitivity(
    model: nn.Module,
    calib_ids: torch.Tensor,
    imatrix: Mapping[str, np.ndarray] | None,
    device: str = "cpu",
    tokens: int = DEFAULT_TOKENS,
    progress: ProgressFn = no_progress,
    grams: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Sensitivity]:
    """Sensitivity of every weight matrix of `model` (Hugging Face weight names), on at most `tokens`
    calibration tokens. The model is run in float32 and left exactly as it was.

    With `grams` (exporter/hessians.py) a matrix that has one is measured in the Gram metric
    (srcr.base.gram.output_error) instead of the importance-weighted one: its curve must be read in the
    metric its candidates' errors are given in."""
    ids = _windows(calib_ids, tokens)
    target = torch.device(device)
    imatrix = imatrix or {}
    grams = grams or {}
    with torch.no_grad(), inference_setup(model), placed(model, target, torch.float32):
        layers = decoder_layers(model)
        names = module_names(model, layers)
        norm, head, softcap = _head(model)
        hidden, layer_kwargs = capture_layer_inputs(model, layers, ids, target)
        states = [hidden]
        for index, layer in enumerate(layers):
            states.append(run_layer(layer, states[-1], layer_kwargs[index]))
        reference = _log_probs(norm, head, softcap, states[-1])

        def kl_from(index: int) -> float:
            hidden = states[index]
            for later in range(index, len(layers)):
                hidden = run_layer(layers[later], hidden, layer_kwargs[later])
            return _mean_kl(reference, _log_probs(norm, head, softcap, hidden))

        matrices = [
            (index, f"{names[index]}.{name}.weight", module)
            for index, layer in enumerate(layers)
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear)
        ]
        embedding = model.get_input_embeddings()
        tied = embedding.weight is head.weight
        total = len(matrices) + 1 + (0 if tied else 1)
        sensitivities: dict[str, Sensitivity] = {}
        for done, (index, name, module) in enumerate(matrices):
            sensitivities[name] = _probed(
                module.weight, _error_measure(imatrix.get(name), grams.get(name)), lambda index=index: kl_from(index)
            )
            progress(f"sensitivity {done + 1}/{total}", done + 1, total)

        def kl_of_all() -> float:
            first, kwargs = capture_layer_inputs(model, layers, ids, target)
            hidden = first
            for index, layer in enumerate(layers):
                hidden = run_layer(layer, hidden, kwargs[index])
            return _mean_kl(reference, _log_probs(norm, head, softcap, hidden))

        unweighted = _error_measure(None, None)  # no importance matrix or Gram for the embedding and head
        names_of = {id(parameter): name for name, parameter in model.named_parameters()}  # a tied one: its first name
        sensitivities[names_of[id(embedding.weight)]] = _probed(embedding.weight, unweighted, kl_of_all)
        if not tied:
            sensitivities[names_of[id(head.weight)]] = _probed(
                head.weight, unweighted, lambda: _mean_kl(reference, _log_probs(norm, head, softcap, states[-1]))
            )
        progress(f"sensitivity {total}/{total}", total, total)
    return sensitivities


class WholeModelKl:
    """The model's mean KL(model || model with some weight matrices replaced) on the first `tokens`
    calibration tokens: a budget's candidate allocations are checked on it (--budget-check), because the
    tensors' losses do not add up (a damaged head hides part of the decoder's damage, docs/results.md).

    Called with Hugging Face weight names -> [out, in] values; the model is left exactly as it was."""

    def __init__(self, model: nn.Module, calib_ids: torch.Tensor, device: str = "cpu", tokens: int = CHECK_TOKENS):
        self._model = model
        self._ids = _windows(calib_ids, tokens)
        self._device = torch.device(device)
        self._reference: torch.Tensor | None = None

    def __call__(self, replaced: Mapping[str, np.ndarray]) -> float:
        model = self._model
        with torch.no_grad(), inference_setup(model), placed(model, self._device, torch.float32):
            parameters = dict(model.named_parameters(remove_duplicate=False))
            unknown = sorted(set(replaced) - set(parameters))
            if unknown:
                raise SrcrError(f"the model has no weight {unknown[0]!r} to check an allocation with; report this")
            if self._reference is None:
                self._reference = self._log_probs()
            originals = {name: parameters[name].data.clone() for name in replaced}
            try:
                for name, values in replaced.items():
                    parameters[name].data.copy_(torch.from_numpy(np.ascontiguousarray(values)))
                return _mean_kl(self._reference, self._log_probs())
            finally:
                for name, original in originals.items():
                    parameters[name].data.copy_(original)

    def _log_probs(self) -> torch.Tensor:
        logits = self._model(input_ids=self._ids.to(self._device)).logits  # final softcapping included
        return torch.log_softmax(logits.float(), dim=-1)


ErrorMeasure = Callable[[np.ndarray, np.ndarray], float]


def _error_measure(importance: np.ndarray | None, gram: torch.Tensor | None) -> ErrorMeasure:
    gram_values = None if gram is None else gram.numpy()
    return lambda weight, rounded: output_error(weight, rounded, importance, gram_values)


def _probed(weight: nn.Parameter, error_of: ErrorMeasure, kl: Callable[[], float]) -> Sensitivity:
    original = weight.data.clone()
    points = []  # (relative error, mean KL) of each probe
    try:
        for bits in (PROBE_BITS, COARSE_PROBE_BITS):
            rounded = probe(original, bits)
            error = error_of(original.cpu().numpy(), rounded.cpu().numpy())
            weight.data.copy_(rounded)
            points.append((error, kl()))
    finally:
        weight.data.copy_(original)
    (error, probe_kl), (coarse_error, coarse_kl) = points
    return Sensitivity(
        kl_per_error=probe_kl / error if error > 0 else 0.0,
        probe_kl=probe_kl,
        probe_error=error,
        coarse_kl=coarse_kl,
        coarse_error=coarse_error,
    )


def _mean_kl(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    return float((reference.exp() * (reference - candidate)).sum(-1).mean())


def _windows(calib_ids: torch.Tensor, tokens: int) -> torch.Tensor:
    """The first calibration windows, as many whole ones as `tokens` allows (at least one, cut to it)."""
    per_window = calib_ids.shape[1]
    if per_window >= tokens:
        return calib_ids[:1, :tokens]
    return calib_ids[: max(1, tokens // per_window)]
