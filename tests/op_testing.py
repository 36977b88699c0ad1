"""Test support shared by the op tests and the benchmarks: which backends to hold to the reference, and
the tolerance rule."""
from __future__ import annotations

import torch

from fasterase.ops import available_backends

# What an install on a GPU machine builds (setup.py: the CUDA kernels; Triton comes with torch on Linux).
# The GPU tests run each of them and fail when one is missing, so they cannot pass by running nothing.
GPU_BACKENDS = ("cuda", "triton")


def bench_backends() -> list[tuple[str, str | None]]:
    """(device, backend) pairs the benchmarks time: the CPU's automatic choice (None), and on a GPU each GPU
    backend, forced (the automatic choice there takes verified backends only)."""
    return [("cpu", None)] + ([("cuda", b) for b in GPU_BACKENDS] if torch.cuda.is_available() else [])


def fast_backends(device: torch.device | str = "cpu") -> list[str]:
    """Every non-reference backend that can run on ``device`` here."""
    return [b for b in available_backends(device) if b != "reference"]


def require_built(backend: str, device: torch.device | str = "cuda") -> None:
    """Fail, not skip, when an expected backend cannot run on ``device``."""
    assert backend in available_backends(device), (
        f"backend {backend!r} is not built for {device} (available: {', '.join(available_backends(device))}); "
        "the CUDA kernels need nvcc, CUDA_HOME and a CUDA build of torch when fasterase is installed")


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
