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
    """Flash-attention-style tolerance for a reduction's result (a loss): a backend may be at most ``factor``
    times as far from the fp64 oracle as the reference computed in the same dtype is, plus one rounding step
    of the output dtype (two correct implementations may round one value to neighbouring representable
    numbers).  Element-wise results and in-place updates take the per-element :func:`assert_update_close`."""
    o = oracle.double()
    ref_err = (ref.double() - o).abs().max().item() if o.numel() else 0.0
    err = (out.double() - o).abs().max().item() if o.numel() else 0.0
    ulp = torch.finfo(out.dtype).eps * o.abs().max().item() if o.numel() else 0.0
    bound = factor * ref_err + ulp + 1e-30
    assert err <= bound, f"{name}: error {err:.3e} vs fp64 exceeds {bound:.3e} (reference's own error {ref_err:.3e})"


def spacing(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The gap between neighbouring numbers of ``dtype`` at magnitude |x| (fp64): eps * 2^e for |x| in
    [2^e, 2^(e+1)), and the subnormal gap below the smallest normal number."""
    info = torch.finfo(dtype)
    mag = x.double().abs().clamp(min=info.smallest_normal)
    _, exponent = torch.frexp(mag)  # mag = m * 2^exponent, m in [0.5, 1)
    return torch.ldexp(torch.full_like(mag, info.eps), exponent - 1)


def unit_roundoff_bound(n: int) -> float:
    """gamma_n = n u / (1 - n u), u = 2^-24: the relative error bound of any fp32 evaluation order of a sum
    of n rounded operations (Higham, Accuracy and Stability of Numerical Algorithms, 3.1)."""
    u = 2.0 ** -24
    return n * u / (1 - n * u)


def assert_update_close(out: torch.Tensor, ref: torch.Tensor, oracle: torch.Tensor,
                        initial: torch.Tensor | None = None, name: str = "", factor: float = 2.0,
                        compute_bound: torch.Tensor | None = None) -> None:
    """Per-element tolerance for an in-place update (new = initial + change) or an element-wise result
    (``initial`` None: the change from zero).

    The change a backend made, out - initial, is held against the fp64 oracle's change, element by element:
        |(out_i - initial_i) - (oracle_i - initial_i)| <= factor * (reference's error at i) + half_i + slack_i
    half_i is half the gap between neighbouring numbers of the output dtype at element i: storing the new
    value rounds by up to that, and no implementation can do better.  slack_i is the fp32 arithmetic's
    error: ``compute_bound`` (an a-priori bound per element, e.g. gamma_n |A||B| for a product) when given,
    else ``factor`` times the largest error the reference makes beyond its own final rounding.  No term
    scales with the largest value of the tensor, so an update far smaller than one rounding step of the
    largest weight must still be made, and rounded to nearest: dropping it, or truncating instead of
    rounding, fails wherever that moves an element past half a step (tests/test_ops_masked_adamw.py
    test_update_tolerance_catches_a_dropped_or_truncated_update).
    """
    assert out.dtype == ref.dtype and out.shape == ref.shape, f"{name}: {out.dtype}{tuple(out.shape)} vs " \
        f"the reference's {ref.dtype}{tuple(ref.shape)}"
    o = oracle.double().reshape(-1)
    if not o.numel():
        return
    got, want = out.double().reshape(-1), ref.double().reshape(-1)
    start = initial.double().reshape(-1) if initial is not None else torch.zeros_like(o)
    change, ref_change, oracle_change = got - start, want - start, o - start
    err = (change - oracle_change).abs()
    ref_err = (ref_change - oracle_change).abs()
    # the gap at the largest of the three: a value rounded across a power of two takes the wider gap
    half = 0.5 * spacing(torch.maximum(o.abs(), torch.maximum(got.abs(), want.abs())), out.dtype)
    if compute_bound is None:
        slack = factor * (ref_err - half).clamp(min=0).max()
    else:
        slack = compute_bound.double().reshape(-1)
    bound = factor * ref_err + half + slack
    excess = err - bound
    worst = int(excess.argmax())
    assert excess[worst] <= 0, (
        f"{name}: {int((excess > 0).sum())} of {o.numel()} elements off; worst at {worst}: change "
        f"{change[worst].item():.6e}, oracle's {oracle_change[worst].item():.6e}, reference's "
        f"{ref_change[worst].item():.6e} (start {start[worst].item():.6e}); error {err[worst].item():.3e} > "
        f"bound {bound[worst].item():.3e}")
