"""Masked AdamW in Triton: a check kernel over the selected gradients, then one program per
256-entry state block (the 8-bit absmax block), so the block's new scale is a register reduction.
The update kernel is launched with enable_fp_fusion=False: each multiply and add rounds on its own, as
in the reference and the CUDA build (--fmad=false); Triton would contract them into FMAs."""
import torch
import triton
import triton.language as tl

from ._rounding import to_storage

BLOCK = 256
CHECK_BLOCK = 1024


@triton.jit
def _param_index(j, valid, idx_ptr, bits_ptr, HAS_IDX: tl.constexpr, HAS_BITS: tl.constexpr):
    if HAS_IDX:
        i = tl.load(idx_ptr + j, mask=valid, other=0).to(tl.int64)
    else:
        i = j
    sel = valid
    if HAS_BITS:
        byte = tl.load(bits_ptr + (i >> 3), mask=valid, other=0).to(tl.int32)
        sel = sel & (((byte >> (i & 7).to(tl.int32)) & 1) != 0)
    return i, sel


@triton.jit
def _check_kernel(grad_ptr, found_ptr, idx_ptr, bits_ptr, length,
                  HAS_IDX: tl.constexpr, HAS_BITS: tl.constexpr, CHECK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * CHECK + tl.arange(0, CHECK)
    i, sel = _param_index(j, j < length, idx_ptr, bits_ptr, HAS_IDX, HAS_BITS)
    g = tl.load(grad_ptr + i, mask=sel, other=0.0).to(tl.float32)
    bad = sel & ((g != g) | (tl.abs(g) == float("inf")))
    nbad = tl.sum(bad.to(tl.int32), axis=0)
    tl.store(found_ptr, 1.0, mask=nbad > 0)


@triton.jit
def _quantize(x, qmap_ptr):
    # nearest code, ties to the lower one: count of code midpoints below x (8-step binary search)
    q = tl.zeros(x.shape, dtype=tl.int32)
    for s in tl.static_range(7, -1, -1):
        c = q + (1 << s)
        mid = (tl.load(qmap_ptr + c - 1) + tl.load(qmap_ptr + c)) * 0.5
        q = tl.where(mid < x, c, q)
    return q.to(tl.uint8)


@triton.jit
def _update_kernel(param_ptr, grad_ptr, m_ptr, v_ptr, found_ptr, consts_ptr, idx_ptr, bits_ptr,
                   absmax_m_ptr, absmax_v_ptr, qmap_m_ptr, qmap_v_ptr, length,
                   beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                   HAS_IDX: tl.constexpr, HAS_BITS: tl.constexpr, EIGHT_BIT: tl.constexpr,
                   BLOCK: tl.constexpr):
    b = tl.program_id(0)
    j = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = j < length
    go = (tl.load(found_ptr) + tl.zeros([BLOCK], dtype=tl.float32)) == 0.0
    i, sel = _param_index(j, valid, idx_ptr, bits_ptr, HAS_IDX, HAS_BITS)
    sel = sel & go
    decay = tl.load(consts_ptr)
    step_size = tl.load(consts_ptr + 1)
    c2 = tl.load(consts_ptr + 2)
    g = tl.load(grad_ptr + i, mask=sel, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + i, mask=sel, other=0.0).to(tl.float32)
    if EIGHT_BIT:
        am_old = tl.load(absmax_m_ptr + b)
        av_old = tl.load(absmax_v_ptr + b)
        mq = tl.load(m_ptr + j, mask=valid, other=0).to(tl.int32)
        vq = tl.load(v_ptr + j, mask=valid, other=0).to(tl.int32)
        m_old = tl.load(qmap_m_ptr + mq) * am_old
        v_old = tl.load(qmap_v_ptr + vq) * av_old
    else:
        m_old = tl.load(m_ptr + j, mask=sel, other=0.0).to(tl.float32)
        v_old = tl.load(v_ptr + j, mask=sel, other=0.0).to(tl.float32)
    m = m_old * beta1 + one_minus_beta1 * g
    v = v_old * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), c2) + eps
    p = p * decay + step_size * tl.div_rn(m, denom)
    tl.store(param_ptr + i, to_storage(p, param_ptr.dtype.element_ty), mask=sel)
    if EIGHT_BIT:
        keep = valid & ~sel
        am = tl.max(tl.where(sel, tl.abs(m), tl.where(keep, tl.abs(m_old), 0.0)), axis=0)
        av = tl.max(tl.where(sel, tl.abs(v), tl.where(keep, tl.abs(v_old), 0.0)), axis=0)
        touched = tl.max(sel.to(tl.int32), axis=0) > 0
        tl.store(absmax_m_ptr + b, am, mask=touched)
        tl.store(absmax_v_ptr + b, av, mask=touched)
        # 1e-38 is below fp32's smallest normal, so Triton types it fp64: cast back (the reference clamps in fp32)
        rm = tl.div_rn(1.0, tl.maximum(am, 1e-38).to(tl.float32))
        rv = tl.div_rn(1.0, tl.maximum(av, 1e-38).to(tl.float32))
        qm = _quantize(tl.minimum(tl.maximum(m * rm, -1.0), 1.0), qmap_m_ptr)
        qv = _quantize(tl.minimum(tl.maximum(v * rv, -1.0), 1.0), qmap_v_ptr)
        tl.store(m_ptr + j, qm, mask=sel)
        tl.store(v_ptr + j, qv, mask=sel)
    else:
        tl.store(m_ptr + j, to_storage(m, m_ptr.dtype.element_ty), mask=sel)
        tl.store(v_ptr + j, to_storage(v, v_ptr.dtype.element_ty), mask=sel)


def masked_adamw(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx,
                 absmax_m, absmax_v, qmap_m, qmap_v, lr, beta1, beta2, eps, weight_decay):
    """Same contract as fasterase.ops.adamw.masked_adamw_reference; never synchronises with the host."""
    length = exp_avg.numel()
    has_idx, has_bits = mask_idx is not None, mask_bits is not None
    dummy = found_inf  # any valid pointer for the unused optional arguments
    idx = mask_idx if has_idx else dummy
    bits = mask_bits if has_bits else dummy
    if length:
        _check_kernel[(triton.cdiv(length, CHECK_BLOCK),)](
            grad, found_inf, idx, bits, length, HAS_IDX=has_idx, HAS_BITS=has_bits, CHECK=CHECK_BLOCK)
    step.add_((found_inf == 0).to(step.dtype))
    # bias corrections from the device-side step, in fp64 like the reference's Python floats
    t = step.double()
    consts = torch.cat([
        torch.full_like(t, 1.0 - lr * weight_decay),
        -lr / (1.0 - torch.pow(beta1, t)),
        torch.sqrt(1.0 - torch.pow(beta2, t)),
    ]).float()
    if not length:
        return
    eight_bit = exp_avg.dtype == torch.uint8
    _update_kernel[(triton.cdiv(length, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, found_inf, consts, idx, bits,
        absmax_m if eight_bit else dummy, absmax_v if eight_bit else dummy,
        qmap_m if eight_bit else dummy, qmap_v if eight_bit else dummy, length,
        beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps,
        HAS_IDX=has_idx, HAS_BITS=has_bits, EIGHT_BIT=eight_bit, BLOCK=BLOCK, enable_fp_fusion=False)
