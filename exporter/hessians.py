"""srcr's GPTQ as a per-tensor candidate of a budget (--quantizer auto): its calibration statistics and solver.

One clean pass over the calibration set (layer by layer, as pruning calibrates) keeps the Gram matrix
E[x xᵀ] of every decoder linear's inputs, one per group of linears that read the same tensor (q/k/v,
gate/up). Each layer sees the unrounded layers before it: which quantizer rounds a predecessor is not
known yet, so GPTQ here is the "independent" variant, every matrix solved on clean inputs.

`PerTensorGptq` then solves any matrix on any grid on demand (srcr.exporter.pruning.gptq, with
SparseGPT's dampening and dead-input rule), so the target can score GPTQ beside llama.cpp's types and
ask again for the codes of the ones it chose; nothing is held but the Gram matrices.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from srcr.base.errors import SrcrError
from srcr.base.gram import GptqSolver
from srcr.base.grids import BlockCodes, grid
from srcr.base.placement import placed
from srcr.base.progress import ProgressFn, no_progress
from srcr.base.shapes import linear_input_dims
from srcr.exporter.pruning.driver import (
    calibrate_layer,
    capture_layer_inputs,
    decoder_layers,
    inference_setup,
    module_names,
)
from srcr.exporter.pruning.gptq import quantize_columnwise
from srcr.exporter.pruning.sparsegpt import SparseGPT, inverse_hessian_upper
from srcr.exporter.pruning.spec import DEFAULT_PERCDAMP, PruneSpec

# The most the Gram matrices may take in memory (float32, one per group of linears sharing an input).
GRAM_MEMORY_LIMIT = 8 * 2**30
_STATISTICS_ONLY = PruneSpec(method="sparsegpt", sparsity=0.0)


def gram_bytes(config: object) -> int:
    """What `input_grams` holds for a model of this config: (in_features)² float32 per distinct input
    (q/k/v share one, o_proj, gate/up share one, down_proj)."""
    dims = linear_input_dims(config)
    hidden, attention, intermediate = dims["q/k/v, gate/up and lm_head"], dims["o_proj"], dims["down_proj"]
    return 4 * int(config.num_hidden_layers) * (2 * hidden * hidden + attention * attention + intermediate**2)


def check_gram_memory(config: object) -> None:
    """Refuse before calibration when the Gram matrices would not fit in `GRAM_MEMORY_LIMIT`."""
    needed = gram_bytes(config)
    if needed > GRAM_MEMORY_LIMIT:
        raise SrcrError(
            f"--quantizer auto keeps each decoder linear's input Gram matrix, {needed / 2**30:.1f} GiB for this "
            f"model (at most {GRAM_MEMORY_LIMIT / 2**30:.0f} GiB); use --quantizer llama.cpp"
        )


def input_grams(
    model: nn.Module, calib_ids: torch.Tensor, device: str = "cpu", progress: ProgressFn = no_progress
) -> dict[str, torch.Tensor]:
    """Hugging Face weight name of every decoder linear -> E[x xᵀ] of its inputs over the calibration
    tokens (float32 [in, in] on the CPU; linears that read the same tensor share one). The model is
    run in float32 and left as it was."""
    target = torch.device(device)
    grams: dict[str, torch.Tensor] = {}
    with torch.no_grad(), inference_setup(model), placed(model, target, torch.float32):
        layers = decoder_layers(model)
        names = module_names(model, layers)
        inputs, layer_kwargs = capture_layer_inputs(model, layers, calib_ids, target)
        for index, layer in enumerate(layers):
            outputs = torch.empty_like(inputs)
            for group in calibrate_layer(layer, inputs, layer_kwargs[index], _STATISTICS_ONLY, SparseGPT, outputs):
                gram = group.method.hessian.div_(2).cpu()  # SparseGPT accumulates 2 E[x xᵀ]
                for name in group.linears:
                    grams[f"{names[index]}.{name}.weight"] = gram
            inputs = outputs
            progress(f"input statistics layer {index + 1}/{len(layers)}", index + 1, len(layers))
    return grams


class PerTensorGptq:
    """GPTQ of one weight matrix of `model` on one grid, on the Gram matrix of its inputs (`input_grams`)."""

    def __init__(
        self,
        model: nn.Module,
        grams: Mapping[str, torch.Tensor],
        device: str = "cpu",
        percdamp: float = DEFAULT_PERCDAMP,
    ) -> None:
        self._parameters = dict(model.named_parameters(remove_duplicate=False))
        self._grams = grams
        self._device = torch.device(device)
        self._percdamp = percdamp
        self._inverse: tuple[int, torch.Tensor, torch.Tensor] | None = None  # the last group's, by Gram id

    def gram(self, name: str) -> np.ndarray | None:
        gram = self._grams.get(name)
        return None if gram is None else gram.numpy()

    def solve(self, name: str, grid_name: str) -> BlockCodes:
        if name not in self._grams:
            raise SrcrError(f"no calibration statistics for {name!r} to run GPTQ on; report this")
        hinv, dead = self._inverse_of(self._grams[name])
        weight = self._parameters[name].detach().to(self._device, torch.float32).clone()
        weight[:, dead] = 0  # an input never seen in calibration carries no calibrated signal
        with torch.no_grad():
            _, codes, _ = quantize_columnwise(weight, hinv, grid(grid_name))
        return codes.map_rows(lambda values: values.cpu())

    def solver(self) -> GptqSolver:
        return GptqSolver(gram=self.gram, solve=self.solve)

    def _inverse_of(self, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Matrices of a group come one after another (q, k, v): one factorization serves them all.
        if self._inverse is None or self._inverse[0] != id(gram):
            hinv, dead = inverse_hessian_upper(gram.to(self._device, copy=True), self._percdamp)
            self._inverse = (id(gram), hinv, dead)
        return self._inverse[1], self._inverse[2]
