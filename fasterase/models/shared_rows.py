"""A network call's rows shared out between the processes of a run under DeepSpeed (training.engine).

Every process draws the whole batch (a step's generator is seeded by (seed, step) alone) and so makes
every call with the same inputs; each runs the network on its own block of rows and receives the
others' outputs (all_gather), so that every process holds the whole output, computes the same loss,
and keeps the same companions (FADE's discriminator, the rollout buffers). Its gradient is its own
rows' part of the whole batch's: the parts sum to the whole gradient over the processes, which the
engine hands DeepSpeed multiplied by the number of processes (DeepSpeed averages).

Every process runs a block of ceil(rows / N) rows, so that all make the same calls on as many rows
(under ZeRO-3 each layer is gathered collectively, forward and backward). Process r owns rows
[r * per, (r + 1) * per) cut at `rows`; a block that would run past the last row reaches back over rows
another process owns instead, and only the rows a process owns carry its graph. A process that owns
no row (rows < N) still runs its block and its backward (zero gradient), for the collectives' sake.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def blocks(rows: int, world: int) -> list[tuple[int, int, int]]:
    """Per process: (start, lo, hi): it runs rows [start, start + per) and owns rows [lo, hi) of them,
    per = ceil(rows / world)."""
    per = -(-rows // world)
    return [(min(r * per, rows - per), min(r * per, rows), min((r + 1) * per, rows)) for r in range(world)]


def shared_rows(run: Callable[[int, int], torch.Tensor], rows: int) -> torch.Tensor:
    """run(lo, hi): the call on rows [lo, hi) of `rows`, as (hi - lo, ...) rows. Returns the whole call's
    output on every process of the default process group, each process's own rows with their graph."""
    world, rank = dist.get_world_size(), dist.get_rank()
    where = blocks(rows, world)
    start = where[rank][0]
    block = run(start, start + -(-rows // world))
    parts = [torch.empty_like(block) for _ in range(world)]
    dist.all_gather(parts, block.detach().contiguous())
    parts[rank] = block
    return torch.cat([part[lo - s:hi - s] for part, (s, lo, hi) in zip(parts, where)])
