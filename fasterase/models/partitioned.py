"""A network's parameters while DeepSpeed ZeRO-3 partitions them (training.engine.partitioned).

Each process then holds one slice of every weight (param.ds_tensor) and param.data is an empty
tensor except while DeepSpeed gathers the weight for a layer's pass, so its shape, its size and its
values must be read through these. Parameters DeepSpeed never partitioned pass through unchanged.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

# network -> DeepSpeed's ZeRO-3 parameter coordinator over it (DeepSpeedZeRoOffload), while it partitions it
COORDINATORS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def shape(p: torch.Tensor) -> torch.Size:
    """The parameter's whole shape."""
    return getattr(p, "ds_shape", p.shape)


def numel(p: torch.Tensor) -> int:
    """The parameter's whole number of entries."""
    return getattr(p, "ds_numel", p.numel())


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modify: bool = False):
    """`params` whole for the block. A collective: every process of the run enters it with the same
    parameters, in the same order. With `modify`, the values written to them in the block are kept (rank
    0's, which every process computes alike here); without, they are released unchanged."""
    partitioned = [p for p in params if is_partitioned(p)]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield


@contextlib.contextmanager
def shaped(params: list[torch.Tensor]):
    """`params` show their whole shape for the block as zero-stride views that hold no memory, for code
    that reads only their shapes, dtypes and devices (peft building LoRA layers over them: gathering every
    layer a LoRA covers would put most of the network whole on the device). Their values are not there:
    nothing in the block may read or write them."""
    parts = [p for p in params if is_partitioned(p) and p.numel() != numel(p)]
    held = [p.data for p in parts]
    for p in parts:
        p.data = torch.empty(1, dtype=p.dtype, device=p.device).expand(p.ds_shape)
    try:
        yield
    finally:
        for p, data in zip(parts, held):
            p.data = data


def release_leftovers(network: torch.nn.Module) -> None:
    """After a backward through `network`: ZeRO-3 frees a layer's gathered weights when the gradient with
    respect to its inputs arrives, which never happens for a layer whose inputs need none (the first
    layers, fed the data) while its weights require grad (saliency maps, CompactDelta's weights); free
    those here, as DeepSpeed's own ZeRO-3 optimizer does after each backward."""
    coordinator = COORDINATORS.get(network)
    if coordinator is not None:
        coordinator.release_backward_leftovers()
