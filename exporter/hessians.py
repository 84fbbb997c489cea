"""srcr's GPTQ as a per-tensor candidate of a budget (--quantizer auto): its calibration statistics and solver.

One clean pass over the calibration set (layer by layer, as pruning calibrates) keeps the Gram matrix
E[x xᵀ] of every decoder linear's inputs, one per group of linears that read the same tensor (q/k/v,
gate/up). Each layer sees the unrounded layers before it: which quantizer rounds a predecessor is not
known yet, so GPTQ here is the "independent" variant, every matrix solved on clean inputs.

`PerTensorGptq` then solves any matrix on any grid on demand (srcr.exporter.pruning.gptq, with
SparseGPT's dampening and dead-input rule), so the target can score GPTQ beside llama.cpp's types and
ask again for the codes of the ones it chose; nothing is held but the Gram matrices.

Those take 4·in² bytes per distinct input (10 GiB for a Llama-3.2-3B, 20 GiB for a 7B): they stay in
memory when they take at most a quarter of what is available, and otherwise go to memory-mapped files
in a scratch folder beside the output (`gram_storage`), which the page cache reads back one matrix at a
time; a run that has room for neither is refused before calibration.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from srcr.base.errors import SrcrError
from srcr.base.files import existing_ancestor
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

# The share of the available memory the Gram matrices may take before they go to disk: the model itself,
# the sensitivity passes and llama.cpp's quantizer need the rest.
MEMORY_SHARE = 0.25
# Free disk space left over after memory-mapped Gram matrices, for the artifact and its temporary copies.
DISK_RESERVE = 2 * 2**30
GramStorage = Literal["memory", "disk"]
_STATISTICS_ONLY = PruneSpec(method="sparsegpt", sparsity=0.0)


def gram_bytes(config: object) -> int:
    """What `input_grams` holds for a model of this config: (in_features)² float32 per distinct input
    (q/k/v share one, o_proj, gate/up share one, down_proj)."""
    dims = linear_input_dims(config)
    hidden, attention, intermediate = dims["q/k/v, gate/up and lm_head"], dims["o_proj"], dims["down_proj"]
    return 4 * int(config.num_hidden_layers) * (2 * hidden * hidden + attention * attention + intermediate**2)


def gram_storage(config: object, folder: Path) -> GramStorage:
    """Where `input_grams` keeps this model's Gram matrices: in memory when they take at most
    `MEMORY_SHARE` of the available memory, else on disk in `folder` (the output's) when it has room and
    `DISK_RESERVE` to spare; a SrcrError naming both when neither has."""
    import psutil

    needed = gram_bytes(config)
    available = psutil.virtual_memory().available
    if needed <= MEMORY_SHARE * available:
        return "memory"
    free = _free_disk(folder)
    if needed + DISK_RESERVE <= free:
        return "disk"
    raise SrcrError(
        f"--quantizer auto keeps each decoder linear's input Gram matrix, {needed / 2**30:.1f} GiB for this model: "
        f"more than a quarter of the {available / 2**30:.1f} GiB of memory available, and the "
        f"{free / 2**30:.1f} GiB free on disk at {folder} leave less than {DISK_RESERVE / 2**30:.0f} GiB beside "
        "them; free disk space there, write the output elsewhere (--out), or use --quantizer llama.cpp"
    )


def _free_disk(folder: Path) -> int:
    import shutil

    return shutil.disk_usage(existing_ancestor(Path(folder).absolute())).free


def input_grams(
    model: nn.Module,
    calib_ids: torch.Tensor,
    device: str = "cpu",
    progress: ProgressFn = no_progress,
    folder: Path | None = None,
) -> dict[str, torch.Tensor]:
    """Hugging Face weight name of every decoder linear -> E[x xᵀ] of its inputs over the calibration
    tokens (float32 [in, in] on the CPU; linears that read the same tensor share one). The model is
    run in float32 and left as it was. With `folder` each matrix is written there and read back
    memory-mapped; the folder must outlive the returned tensors."""
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
                if folder is not None:
                    gram = _mapped(gram, Path(folder) / f"{len(grams)}.f32")
                for name in group.linears:
                    grams[f"{names[index]}.{name}.weight"] = gram
            inputs = outputs
            where = " (Gram matrices on disk)" if folder is not None else ""
            progress(f"input statistics layer {index + 1}/{len(layers)}{where}", index + 1, len(layers))
    return grams


def _mapped(gram: torch.Tensor, path: Path) -> torch.Tensor:
    """`gram` written to `path` and read back memory-mapped (copy-on-write: no reader changes the file)."""
    array = gram.numpy()
    with path.open("wb") as handle:
        array.tofile(handle)
    return torch.from_numpy(np.memmap(path, dtype=array.dtype, mode="c", shape=array.shape))


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
