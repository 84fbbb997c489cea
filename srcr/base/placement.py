"""Moving a module to a device and dtype for a while, and putting every tensor back exactly as it was.

`module.to(dtype)` casts floating buffers too, and a plain `.to()` back does not undo that: rotary
tables that transformers keeps in float32 inside a bfloat16 model would come back rounded. So the
placement of every parameter and buffer is recorded first and restored one by one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

Placement = dict[str, tuple["torch.device", "torch.dtype"]]


def record(module: nn.Module) -> Placement:
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return {name: (tensor.device, tensor.dtype) for name, tensor in tensors}


def restore(module: nn.Module, placement: Placement) -> None:
    """Put each parameter and buffer back on the device and in the dtype `placement` recorded.

    The module may have changed meanwhile (structured pruning removes layers and replaces linears):
    tensors that are gone are skipped, and parameters it did not have take the first parameter's placement.
    """
    if not placement:
        return
    first = next(iter(placement.values()))
    parameters = dict(module.named_parameters())
    for name, tensor in [*parameters.items(), *module.named_buffers()]:
        if name not in placement and not (name in parameters and tensor.is_floating_point()):
            continue
        device, dtype = placement.get(name, first)
        if tensor.device == device and tensor.dtype == dtype:
            continue
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if attribute in owner._parameters:
            owner._parameters[attribute].data = tensor.data.to(device=device, dtype=dtype)
        else:
            owner._buffers[attribute] = tensor.to(device=device, dtype=dtype)


@contextmanager
def placed(
    module: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Iterator[None]:
    """The module on `device` in `dtype` (floating tensors) for the block, then every tensor as it was."""
    placement = record(module)
    module.to(device=device, dtype=dtype)
    try:
        yield
    finally:
        restore(module, placement)
