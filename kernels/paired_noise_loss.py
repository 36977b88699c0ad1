"""Paired noise loss in Triton: one program per (sample, chunk) writes both gradients and a loss
partial; the partials are summed in fp64 in a fixed order (deterministic).  The programs are numbered
on grid axis 0 alone (up to 2^31 - 1; axes 1 and 2 stop at 65535 chunks or samples). Launched with
enable_fp_fusion=False: each multiply and add rounds on its own, as in the reference and the CUDA build
(--fmad=false)."""
import torch
import triton
import triton.language as tl

from ._rounding import to_storage

CHUNK = 2048


@triton.jit
def _paired_kernel(pc_ptr, pu_ptr, tc_ptr, tu_ptr, sign_ptr, w_ptr, wu_ptr, gc_ptr, gu_ptr, part_ptr,
                   n, chunks, eta, two_over_n, HAS_UNCOND: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // chunks
    ch = pid % chunks
    e = ch * CHUNK + tl.arange(0, CHUNK)
    inside = e < n
    offs = b.to(tl.int64) * n + e
    scale = tl.load(sign_ptr + b) * eta
    w = tl.load(w_ptr + b)
    u = tl.load(tu_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    tc = tl.load(tc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    pc = tl.load(pc_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dc = pc - (u + scale * (tc - u))
    tl.store(gc_ptr + offs, to_storage((two_over_n * w) * dc, gc_ptr.dtype.element_ty), mask=inside)
    partial = w * tl.sum(dc * dc, axis=0)
    if HAS_UNCOND:
        wu = tl.load(wu_ptr + b)
        du = tl.load(pu_ptr + offs, mask=inside, other=0.0).to(tl.float32) - u
        tl.store(gu_ptr + offs, to_storage((two_over_n * wu) * du, gu_ptr.dtype.element_ty), mask=inside)
        partial += wu * tl.sum(du * du, axis=0)
    tl.store(part_ptr + pid, partial)


def paired_noise_loss(pred_cond, pred_uncond, teacher_cond, teacher_uncond, sign, weight, uncond_weight, eta):
    """(loss, grad_cond, grad_uncond) with fasterase.ops.noise_loss reference semantics."""
    batch = pred_cond.shape[0]
    n = pred_cond[0].numel() if batch else 0
    grad_c = torch.empty_like(pred_cond)
    has_u = pred_uncond is not None
    grad_u = torch.empty_like(pred_uncond) if has_u else pred_cond.new_empty(0)
    if batch == 0 or n == 0:
        return pred_cond.new_zeros((), dtype=torch.float32), grad_c, grad_u
    chunks = triton.cdiv(n, CHUNK)
    if batch * chunks > 2 ** 31 - 1:
        raise ValueError(f"{batch} samples of {n} elements need {batch * chunks} programs of {CHUNK} elements; "
                         "a Triton grid holds at most 2^31 - 1")
    partials = torch.empty(batch * chunks, dtype=torch.float32, device=pred_cond.device)
    _paired_kernel[(batch * chunks,)](
        pred_cond, pred_uncond if has_u else pred_cond, teacher_cond, teacher_uncond, sign, weight,
        uncond_weight, grad_c, grad_u if has_u else grad_c, partials, n, chunks, float(eta), 2.0 / n,
        HAS_UNCOND=has_u, CHUNK=CHUNK, enable_fp_fusion=False)
    return (partials.double().sum() / n).float(), grad_c, grad_u
