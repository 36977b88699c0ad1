"""masked_adamw: one fused, saliency-masked AdamW step over a flat parameter buffer.

Semantics (torch.optim.AdamW, decoupled weight decay, bias correction), for every *selected*
element i, with its state entry j (j = i for dense/bitmask masks, j = position of i in an
index mask, whose states are compact) and t = step + 1:

    m_j = beta1 * m_j + (1 - beta1) * g_i
    v_j = beta2 * v_j + (1 - beta2) * g_i**2
    p_i = p_i * (1 - lr * weight_decay) - lr / (1 - beta1**t) * m_j / (sqrt(v_j) / sqrt(1 - beta2**t) + eps)

computed in fp32 whatever the storage dtype (param/grad fp32 or bf16; states fp32, bf16 or 8-bit,
see :mod:`fasterase.ops.quant`), then rounded to nearest.  Unselected params and their states are
never written.  In 8-bit mode a block's absmax is the largest magnitude of its selected entries'
new values and its unselected entries' current values; blocks without a selected entry are left
alone, and unselected codes keep their bits (so their values stay exact when they are zero, as
they always are under a mask fixed from the start, and trivially with index masks, whose
states hold selected entries only).

Skipping: if ``found_inf`` is non-zero on entry, or any selected gradient is not finite, nothing
is written except ``found_inf`` (set to 1) and ``step`` is not advanced; otherwise ``step += 1``.
Both are one-element fp32 tensors on the param's device, so nothing synchronises with the host.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import _dispatch
from .quant import BLOCK, dequantize_blockwise, dynamic_map, num_blocks, quantize_codes, unpack_mask

OP = "masked_adamw"
_PARAM_DTYPES = (torch.float32, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


@torch.library.custom_op(
    "fasterase::masked_adamw",
    mutates_args=("param", "exp_avg", "exp_avg_sq", "step", "found_inf", "absmax_m", "absmax_v"),
)
def _masked_adamw_op(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    found_inf: torch.Tensor,
    mask_bits: Optional[torch.Tensor],
    mask_idx: Optional[torch.Tensor],
    absmax_m: Optional[torch.Tensor],
    absmax_v: Optional[torch.Tensor],
    qmap_m: Optional[torch.Tensor],
    qmap_v: Optional[torch.Tensor],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    backend = _dispatch.select(OP, param.device)
    args = (param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx,
            absmax_m, absmax_v, qmap_m, qmap_v, lr, beta1, beta2, eps, weight_decay)
    if backend == "reference":
        masked_adamw_reference(*args)
    elif backend == "triton":
        _dispatch.triton_kernels().masked_adamw(*args)
    else:  # cpp and cuda share one entry point in fasterase._C, which dispatches on device
        _dispatch.native().masked_adamw(*args)


@_masked_adamw_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx, absmax_m, absmax_v,
      qmap_m, qmap_v, lr, beta1, beta2, eps, weight_decay):
    return None


def _up(t: torch.Tensor) -> torch.Tensor:
    """The compute dtype: fp32, or fp64 when the tests run the reference as a high-precision oracle."""
    return t.double() if t.dtype == torch.float64 else t.float()


def masked_adamw_reference(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx,
                           absmax_m, absmax_v, qmap_m, qmap_v, lr, beta1, beta2, eps, weight_decay):
    """The specification (module docstring), in plain torch ops; synchronises, so tests/CPU only."""
    n = param.numel()
    p, g = param.view(-1), grad.view(-1)
    if mask_idx is not None:
        sel = mask_idx.long()
        state_sel = torch.arange(sel.numel(), device=param.device)
    elif mask_bits is not None:
        sel = unpack_mask(mask_bits, n).nonzero().view(-1)
        state_sel = sel
    else:
        sel = state_sel = torch.arange(n, device=param.device)
    gs = _up(g[sel])
    if bool(found_inf.item() != 0) or not bool(torch.isfinite(gs).all()):
        found_inf.fill_(1)
        return
    step.add_(1)
    t = float(step.item())
    eight_bit = exp_avg.dtype == torch.uint8
    if eight_bit:
        m_all = dequantize_blockwise(exp_avg, absmax_m, qmap_m)
        v_all = dequantize_blockwise(exp_avg_sq, absmax_v, qmap_v)
    else:
        m_all, v_all = _up(exp_avg.view(-1)), _up(exp_avg_sq.view(-1))
    m = m_all[state_sel].mul(beta1).add_(gs, alpha=1 - beta1)
    v = v_all[state_sel].mul(beta2).addcmul_(gs, gs, value=1 - beta2)
    c1 = 1 - beta1 ** t
    c2 = math.sqrt(1 - beta2 ** t)
    pf = _up(p[sel]).mul_(1 - lr * weight_decay)
    pf.addcdiv_(m, (v.sqrt() / c2).add_(eps), value=-lr / c1)
    p[sel] = pf.to(p.dtype)
    if not eight_bit:
        exp_avg.view(-1)[state_sel] = m.to(exp_avg.dtype)
        exp_avg_sq.view(-1)[state_sel] = v.to(exp_avg_sq.dtype)
        return
    touched = torch.zeros(num_blocks(m_all.numel()), dtype=torch.bool, device=param.device)
    touched[state_sel // BLOCK] = True
    for codes, absmax, values, new, qmap in ((exp_avg, absmax_m, m_all, m, qmap_m),
                                             (exp_avg_sq, absmax_v, v_all, v, qmap_v)):
        values[state_sel] = new
        length = values.numel()
        padded = torch.nn.functional.pad(values.abs(), (0, num_blocks(length) * BLOCK - length))
        new_absmax = torch.where(touched, padded.view(-1, BLOCK).amax(dim=1), absmax)
        per_entry = new_absmax.repeat_interleave(BLOCK)[:length]
        codes.view(-1)[state_sel] = quantize_codes(new, per_entry[state_sel], qmap)
        absmax.copy_(new_absmax)


def _check_flat(name: str, t: torch.Tensor, device: torch.device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the param's device)")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; valid: {', '.join(map(str, dtypes))}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def masked_adamw(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: torch.Tensor,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Optional[torch.Tensor] = None,
    absmax: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One in-place masked AdamW step (see the module docstring); returns ``found_inf``.

    param/grad: contiguous, same numel, fp32 or bf16.  exp_avg/exp_avg_sq: fp32, bf16 or uint8
    (8-bit, then ``absmax=(absmax_m, absmax_v)`` fp32 of ceil(L/256) entries is required), with
    L = param.numel(), or L = mask.numel() for an index mask.  mask: None (all), uint8 bitmask or
    sorted int32 indices.  step: one-element fp32 count of steps taken.  found_inf: one-element
    fp32 flag shared across calls to skip a whole optimizer step (allocated when None).
    """
    device = param.device
    _check_flat("param", param, device, _PARAM_DTYPES)
    _check_flat("grad", grad, device, _PARAM_DTYPES)
    if grad.numel() != param.numel():
        raise ValueError(f"grad has {grad.numel()} elements, param has {param.numel()}")
    n = param.numel()
    mask_bits = mask_idx = None
    length = n
    if mask is not None:
        _check_flat("mask", mask, device, (torch.uint8, torch.int32))
        if mask.dtype == torch.uint8:
            if mask.numel() != (n + 7) // 8:
                raise ValueError(f"bitmask has {mask.numel()} bytes, expected ceil({n}/8) = {(n + 7) // 8}")
            mask_bits = mask
        else:
            mask_idx, length = mask, mask.numel()
    for name, state in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_flat(name, state, device, _STATE_DTYPES)
        if state.numel() != length:
            raise ValueError(f"{name} has {state.numel()} entries, expected {length} "
                             f"({'one per index' if mask_idx is not None else 'one per param'})")
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError(f"exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must share a dtype")
    absmax_m = absmax_v = qmap_m = qmap_v = None
    if exp_avg.dtype == torch.uint8:
        if absmax is None:
            raise ValueError("8-bit states need absmax=(absmax_m, absmax_v)")
        absmax_m, absmax_v = absmax
        for name, a in (("absmax_m", absmax_m), ("absmax_v", absmax_v)):
            _check_flat(name, a, device, (torch.float32,))
            if a.numel() != num_blocks(length):
                raise ValueError(f"{name} has {a.numel()} entries, expected ceil({length}/256) = {num_blocks(length)}")
        qmap_m, qmap_v = dynamic_map(True, device), dynamic_map(False, device)
    elif absmax is not None:
        raise ValueError("absmax is only valid with 8-bit (uint8) states")
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    for name, t in (("step", step), ("found_inf", found_inf)):
        _check_flat(name, t, device, (torch.float32,))
        if t.numel() != 1:
            raise ValueError(f"{name} must have exactly one element")
    beta1, beta2 = betas
    if not (lr >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and eps > 0 and weight_decay >= 0):
        raise ValueError(f"need lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0; got "
                         f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
    torch.ops.fasterase.masked_adamw(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx,
                                     absmax_m, absmax_v, qmap_m, qmap_v, float(lr), float(beta1),
                                     float(beta2), float(eps), float(weight_decay))
    return found_inf
