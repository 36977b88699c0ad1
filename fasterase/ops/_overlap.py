"""The one rule the in-place ops share: tensors they write do not overlap one another (nor what they
read while writing, such as a mask). The native kernels write every tensor in parallel, where the
reference writes one after another, so an alias would race on the GPU and give another result."""
from __future__ import annotations

from typing import Optional

import torch


def check_disjoint(named: list[tuple[str, Optional[torch.Tensor]]]) -> None:
    """ValueError naming two of the (contiguous) tensors that share memory; None entries are skipped."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                   for name, t in named if t is not None and t.numel())
    reach, holder = 0, None
    for start, end, name in spans:
        if start < reach:
            raise ValueError(f"{holder} and {name} share memory; every tensor an update writes (or reads "
                             "while writing, as a mask) needs its own")
        if end > reach:
            reach, holder = end, name
