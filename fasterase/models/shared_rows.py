"""A network call's rows shared out between the processes of a run under DeepSpeed (training.engine).

Every process draws the whole batch (a step's generator is seeded by (seed, step) alone) and so makes
every call with the same inputs; each runs the network on its own block of rows and receives the
others' outputs (all_gather), so that every process holds the whole output, computes the same loss,
and keeps the same companions (FADE's discriminator, the rollout buffers). Its gradient is its own
rows' part of the whole batch's: the parts sum to the whole gradient over the processes, which the
engine hands DeepSpeed multiplied by the number of processes (DeepSpeed averages).

A call whose rows do not divide evenly runs whole on every process (under ZeRO-3 each layer is
gathered collectively, so every process must make the same calls on as many rows), with its gradient
divided by the number of processes so that the sum counts it once; its value is exact:
out + (out - out) / N is out.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def shared_rows(run: Callable[[int, int], torch.Tensor], rows: int) -> torch.Tensor:
    """run(lo, hi): the call on rows [lo, hi) of `rows`, as (hi - lo, ...) rows. Returns the whole call's
    output on every process of the default process group, each process's own rows with their graph."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if rows % world:
        out = run(0, rows)
        return out.detach() + (out - out.detach()) / world if out.requires_grad else out
    per = rows // world
    own = run(rank * per, (rank + 1) * per)
    parts = [torch.empty_like(own) for _ in range(world)]
    dist.all_gather(parts, own.detach().contiguous())
    parts[rank] = own
    return torch.cat(parts)
