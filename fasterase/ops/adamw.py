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

:func:`masked_adamw_multi` is the list form an optimizer step uses: one call for all of a device's
tensors (each with its own step count and hyperparameters) and one skip decision for all of them:
if ``found_inf`` is set on entry or *any entry of any gradient* is not finite (masked-out entries
included, as an optimizer-wide rule), nothing is written except ``found_inf`` (set to 1) and no
step advances; otherwise every tensor takes the step :func:`masked_adamw` would take.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import _dispatch
from ._overlap import check_disjoint
from .quant import BLOCK, check_indices, dequantize_blockwise, dynamic_map, num_blocks, quantize_codes, unpack_mask

OP = "masked_adamw"
OP_MULTI = "masked_adamw_multi"
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
        with _dispatch.on_device(param.device):
            _dispatch.triton_kernels().masked_adamw(*args)
    else:  # cpp and cuda share one entry point in fasterase._C, which dispatches on device
        _dispatch.native().masked_adamw(*args)


@_masked_adamw_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx, absmax_m, absmax_v,
      qmap_m, qmap_v, lr, beta1, beta2, eps, weight_decay):
    return None


_MULTI_MUTATES = ("params", "exp_avgs", "exp_avg_sqs", "steps", "found_inf", "absmax_m", "absmax_v")


@torch.library.custom_op("fasterase::masked_adamw_multi", mutates_args=_MULTI_MUTATES)
def _masked_adamw_multi_op(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor],
    found_inf: torch.Tensor,
    mask_bits: list[Optional[torch.Tensor]],
    mask_idx: list[Optional[torch.Tensor]],
    absmax_m: list[Optional[torch.Tensor]],
    absmax_v: list[Optional[torch.Tensor]],
    qmap_m: Optional[torch.Tensor],
    qmap_v: Optional[torch.Tensor],
    lrs: list[float],
    beta1s: list[float],
    beta2s: list[float],
    epss: list[float],
    weight_decays: list[float],
) -> None:
    backend = _dispatch.select(OP_MULTI, found_inf.device)
    args = (params, grads, exp_avgs, exp_avg_sqs, steps, found_inf, mask_bits, mask_idx, absmax_m, absmax_v,
            qmap_m, qmap_v, lrs, beta1s, beta2s, epss, weight_decays)
    if backend == "reference":
        masked_adamw_multi_reference(*args)
    elif backend == "triton":
        with _dispatch.on_device(found_inf.device):
            masked_adamw_multi_loop(_dispatch.triton_kernels().masked_adamw, *args)
    else:  # cpp and cuda: one native call, one check over all gradients, then the update of all tensors
        _dispatch.native().masked_adamw_multi(*args)


@_masked_adamw_multi_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, steps, found_inf, mask_bits, mask_idx, absmax_m, absmax_v,
      qmap_m, qmap_v, lrs, beta1s, beta2s, epss, weight_decays):
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


def masked_adamw_multi_reference(params, grads, exp_avgs, exp_avg_sqs, steps, found_inf, mask_bits, mask_idx,
                                 absmax_m, absmax_v, qmap_m, qmap_v, lrs, beta1s, beta2s, epss, weight_decays):
    """The specification of the list form (module docstring): one skip decision over every entry of
    every gradient, then each tensor's masked_adamw_reference step."""
    if bool(found_inf.item() != 0) or not all(bool(torch.isfinite(g).all()) for g in grads):
        found_inf.fill_(1)
        return
    for k in range(len(params)):
        masked_adamw_reference(params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], steps[k], found_inf,
                               mask_bits[k], mask_idx[k], absmax_m[k], absmax_v[k], qmap_m, qmap_v,
                               lrs[k], beta1s[k], beta2s[k], epss[k], weight_decays[k])


def masked_adamw_multi_loop(per_tensor, params, grads, exp_avgs, exp_avg_sqs, steps, found_inf, mask_bits,
                            mask_idx, absmax_m, absmax_v, qmap_m, qmap_v, lrs, beta1s, beta2s, epss,
                            weight_decays):
    """The list form on the backend without a multi-tensor kernel (Triton): not fused.  A device-side
    check of every gradient sets ``found_inf`` first (no host synchronisation), then one per-tensor
    ``per_tensor`` call (same arguments as masked_adamw_reference) per tensor, all sharing the flag, so
    a skipped step is skipped by every call before any of them writes."""
    if grads:
        bad = torch.stack([(~torch.isfinite(g)).any() for g in grads]).any()
        found_inf.masked_fill_(bad, 1.0)
    for k in range(len(params)):
        per_tensor(params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], steps[k], found_inf, mask_bits[k],
                   mask_idx[k], absmax_m[k], absmax_v[k], qmap_m, qmap_v, lrs[k], beta1s[k], beta2s[k],
                   epss[k], weight_decays[k])


def _check_flat(name: str, t: torch.Tensor, device: torch.device, dtypes) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (the param's device)")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; valid: {', '.join(map(str, dtypes))}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_tensor(param, grad, exp_avg, exp_avg_sq, mask, absmax, device):
    """Validates one tensor's arguments; returns (mask_bits, mask_idx, absmax_m, absmax_v)."""
    _check_flat("param", param, device, _PARAM_DTYPES)
    _check_flat("grad", grad, device, _PARAM_DTYPES)
    if grad.numel() != param.numel():
        raise ValueError(f"grad has {grad.numel()} elements, param has {param.numel()}")
    n = param.numel()
    mask_bits = mask_idx = None
    length = n
    if mask is not None:
        _check_flat("mask", mask, device, (torch.uint8, torch.int32))
        if mask.dim() != 1:
            raise ValueError(f"mask must be 1-D (flat), got shape {tuple(mask.shape)}")
        if mask.dtype == torch.uint8:
            if mask.numel() != (n + 7) // 8:
                raise ValueError(f"bitmask has {mask.numel()} bytes, expected ceil({n}/8) = {(n + 7) // 8}")
            mask_bits = mask
        else:
            check_indices(mask, n)
            mask_idx, length = mask, mask.numel()
    for name, state in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_flat(name, state, device, _STATE_DTYPES)
        if state.numel() != length:
            raise ValueError(f"{name} has {state.numel()} entries, expected {length} "
                             f"({'one per index' if mask_idx is not None else 'one per param'})")
    if exp_avg.dtype != exp_avg_sq.dtype:
        raise TypeError(f"exp_avg ({exp_avg.dtype}) and exp_avg_sq ({exp_avg_sq.dtype}) must share a dtype")
    absmax_m = absmax_v = None
    if exp_avg.dtype == torch.uint8:
        if absmax is None:
            raise ValueError("8-bit states need absmax=(absmax_m, absmax_v)")
        absmax_m, absmax_v = absmax
        for name, a in (("absmax_m", absmax_m), ("absmax_v", absmax_v)):
            _check_flat(name, a, device, (torch.float32,))
            if a.numel() != num_blocks(length):
                raise ValueError(f"{name} has {a.numel()} entries, expected ceil({length}/256) = {num_blocks(length)}")
    elif absmax is not None:
        raise ValueError("absmax is only valid with 8-bit (uint8) states")
    return mask_bits, mask_idx, absmax_m, absmax_v


def _check_scalars(step, found_inf, device, lr, beta1, beta2, eps, weight_decay):
    for name, t in (("step", step), ("found_inf", found_inf)):
        _check_flat(name, t, device, (torch.float32,))
        if t.numel() != 1:
            raise ValueError(f"{name} must have exactly one element")
    if not (lr >= 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and eps > 0 and weight_decay >= 0):
        raise ValueError(f"need lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0; got "
                         f"lr={lr}, betas={(beta1, beta2)}, eps={eps}, weight_decay={weight_decay}")


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
    L = param.numel(), or L = mask.numel() for an index mask.  mask: None (all), 1-D uint8 bitmask or
    1-D sorted, duplicate-free int32 indices within [0, param.numel()) (checked once per mask:
    quant.check_indices).  step: one-element fp32 count of steps taken.  found_inf: one-element fp32
    flag shared across calls to skip a whole optimizer step (allocated when None).
    """
    device = param.device
    mask_bits, mask_idx, absmax_m, absmax_v = _check_tensor(param, grad, exp_avg, exp_avg_sq, mask, absmax, device)
    qmap_m = qmap_v = None
    if absmax_m is not None:
        qmap_m, qmap_v = dynamic_map(True, device), dynamic_map(False, device)
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    beta1, beta2 = betas
    _check_scalars(step, found_inf, device, lr, beta1, beta2, eps, weight_decay)
    check_disjoint([("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("step", step),
                    ("found_inf", found_inf), ("absmax_m", absmax_m), ("absmax_v", absmax_v), ("mask", mask)])
    torch.ops.fasterase.masked_adamw(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx,
                                     absmax_m, absmax_v, qmap_m, qmap_v, float(lr), float(beta1),
                                     float(beta2), float(eps), float(weight_decay))
    return found_inf


def _per_tensor(name: str, value, count: int) -> list[float]:
    """A hyperparameter given once for all tensors, or once per tensor."""
    if isinstance(value, (int, float)):
        return [float(value)] * count
    values = [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} tensors")
    return values


def masked_adamw_multi(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    steps: Sequence[torch.Tensor],
    *,
    lr: Union[float, Sequence[float]],
    betas: Union[tuple[float, float], Sequence[tuple[float, float]]] = (0.9, 0.999),
    eps: Union[float, Sequence[float]] = 1e-8,
    weight_decay: Union[float, Sequence[float]] = 1e-2,
    masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    absmax: Optional[Sequence[Optional[tuple[torch.Tensor, torch.Tensor]]]] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One optimizer step over lists of tensors on one device, skipped for all of them if any
    gradient has a non-finite entry (module docstring); returns ``found_inf``.

    Each tensor's arguments are as in :func:`masked_adamw` (its own ``steps`` entry; ``masks`` and
    ``absmax`` entries may be None).  lr, eps, weight_decay: one value, or one per tensor; betas: one
    pair, or one pair per tensor.  The C++ and CUDA backends take all tensors in one native call (on CUDA
    three launches in all); Triton loops over its per-tensor kernels (see masked_adamw_multi_loop).
    """
    count = len(params)
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, steps=steps)
    if masks is not None:
        lists["masks"] = masks
    if absmax is not None:
        lists["absmax"] = absmax
    for name, values in lists.items():
        if len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries for {count} params")
    if count == 0 and found_inf is None:
        raise ValueError("masked_adamw_multi needs at least one tensor, or found_inf to say the device")
    device = params[0].device if count else found_inf.device
    if found_inf is None:
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
    lrs = _per_tensor("lr", lr, count)
    epss = _per_tensor("eps", eps, count)
    weight_decays = _per_tensor("weight_decay", weight_decay, count)
    if len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas):
        beta1s, beta2s = [float(betas[0])] * count, [float(betas[1])] * count
    else:
        if len(betas) != count:
            raise ValueError(f"betas has {len(betas)} pairs for {count} tensors")
        beta1s, beta2s = [float(b[0]) for b in betas], [float(b[1]) for b in betas]
    bits, idx, am, av = [], [], [], []
    eight_bit = False
    for k in range(count):
        if params[k].device != device:
            raise ValueError(f"params[{k}] is on {params[k].device}, expected {device}: one call per device")
        b, i, m, v = _check_tensor(params[k], grads[k], exp_avgs[k], exp_avg_sqs[k],
                                   None if masks is None else masks[k], None if absmax is None else absmax[k],
                                   device)
        _check_scalars(steps[k], found_inf, device, lrs[k], beta1s[k], beta2s[k], epss[k], weight_decays[k])
        bits.append(b)
        idx.append(i)
        am.append(m)
        av.append(v)
        eight_bit |= m is not None
    check_disjoint([("found_inf", found_inf)] + [
        (f"{name}[{k}]", t) for name, ts in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                                             ("steps", steps), ("absmax_m", am), ("absmax_v", av),
                                             ("masks", masks or []))
        for k, t in enumerate(ts)])
    qmap_m = dynamic_map(True, device) if eight_bit else None
    qmap_v = dynamic_map(False, device) if eight_bit else None
    torch.ops.fasterase.masked_adamw_multi(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                                           list(steps), found_inf, bits, idx, am, av, qmap_m, qmap_v,
                                           lrs, beta1s, beta2s, epss, weight_decays)
    return found_inf
