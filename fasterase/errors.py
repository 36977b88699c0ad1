"""The one exception type for a mistake in what the user asked for, and how an out-of-memory error is told.

Raised for bad input (an unknown option, a concept the tokenizer cannot hold, a folder that may
not be overwritten, a pipeline no adapter handles). The CLI reports it as one line with exit
status 2; every other exception is a bug or a failure and keeps its traceback (exit 1). It is a
ValueError, so callers of the API that catch ValueError keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the problem and what is valid."""


def out_of_memory(exc: BaseException) -> bool:
    """torch ran out of memory: a CUDA allocation (torch.cuda.OutOfMemoryError) or a CPU one, which torch
    raises as a plain RuntimeError naming its DefaultCPUAllocator (one that the kernel's OOM killer ends
    is not seen at all)."""
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (
        type(exc) is RuntimeError and "DefaultCPUAllocator: can't allocate memory" in str(exc))


def past_any_memory(exc: BaseException) -> bool:
    """torch's size check failed: a tensor past 2**63 bytes, which no machine holds (the planner meets it on
    the meta device, erase when it draws the noise)."""
    return type(exc) is RuntimeError and "Storage size calculation overflowed" in str(exc)
