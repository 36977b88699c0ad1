"""Test support shared by the op tests: which backends to hold to the reference, and the tolerance rule."""
from __future__ import annotations

import torch

from ._dispatch import available_backends


def fast_backends(device: torch.device | str = "cpu") -> list[str]:
    """Every non-reference backend that can run on ``device`` here."""
    return [b for b in available_backends(device) if b != "reference"]


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor, name: str = "",
                              factor: float = 2.0) -> None:
    """Flash-attention-style tolerance: a backend may be at most ``factor`` times as far from the fp64
    oracle as the reference computed in the same dtype is, plus one rounding step of the output dtype
    (two correct implementations may round one value to neighbouring representable numbers)."""
    o = oracle.double()
    ref_err = (ref.double() - o).abs().max().item() if o.numel() else 0.0
    err = (out.double() - o).abs().max().item() if o.numel() else 0.0
    ulp = torch.finfo(out.dtype).eps * o.abs().max().item() if o.numel() else 0.0
    bound = factor * ref_err + ulp + 1e-30
    assert err <= bound, f"{name}: error {err:.3e} vs fp64 exceeds {bound:.3e} (reference's own error {ref_err:.3e})"
