"""paired_noise_loss: ESD/ANT paired conditional/unconditional losses, loss and gradients in one pass."""
from __future__ import annotations

from typing import Optional

import torch

from . import _dispatch

OP = "paired_noise_loss"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.library.custom_op("fasterase::paired_noise_loss", mutates_args=())
def _paired_op(
    pred_cond: torch.Tensor,
    pred_uncond: Optional[torch.Tensor],
    teacher_cond: torch.Tensor,
    teacher_uncond: torch.Tensor,
    sign: torch.Tensor,
    weight: torch.Tensor,
    uncond_weight: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _dispatch.select(OP, pred_cond.device)
    if backend != "reference":  # the kernels read and write flat, contiguous buffers (no-op when they are)
        pred_cond, teacher_cond, teacher_uncond = (t.contiguous() for t in (pred_cond, teacher_cond, teacher_uncond))
        pred_uncond = None if pred_uncond is None else pred_uncond.contiguous()
    args = (pred_cond, pred_uncond, teacher_cond, teacher_uncond, sign, weight, uncond_weight, eta)
    if backend == "reference":
        return paired_noise_loss_reference(*args)
    if backend == "triton":
        with _dispatch.on_device(pred_cond.device):
            return _dispatch.triton_kernels().paired_noise_loss(*args)
    return tuple(_dispatch.native().paired_noise_loss(*args))


@_paired_op.register_fake
def _(pred_cond, pred_uncond, teacher_cond, teacher_uncond, sign, weight, uncond_weight, eta):
    # contiguous whatever the predictions' layout, as every backend returns them
    grad_c = pred_cond.new_empty(pred_cond.shape)
    grad_u = pred_uncond.new_empty(pred_uncond.shape) if pred_uncond is not None else pred_cond.new_empty(0)
    return pred_cond.new_empty((), dtype=torch.float32), grad_c, grad_u


def paired_noise_loss_reference(pred_cond, pred_uncond, teacher_cond, teacher_uncond, sign, weight,
                                uncond_weight, eta):
    """The specification: (loss, d loss/d pred_cond, d loss/d pred_uncond), all arithmetic in fp32.

    With B samples of N elements each, per sample b:
        target_b = tu_b + sign_b * eta * (tc_b - tu_b)
        loss     = sum_b weight_b        * mean_i (pred_cond_b  - target_b)^2
                 + sum_b uncond_weight_b * mean_i (pred_uncond_b - tu_b)^2
    The second sum is dropped when pred_uncond is None (then grad_uncond is an empty tensor).
    Gradients are returned in the predictions' dtypes: 2 * w_b / N * (pred - target).
    """
    b = pred_cond.shape[0]
    n = pred_cond[0].numel() if b else 0
    up = torch.float64 if pred_cond.dtype == torch.float64 else torch.float32  # fp64: the tests' oracle
    pc = pred_cond.reshape(b, -1).to(up)
    tc = teacher_cond.reshape(b, -1).to(up)
    tu = teacher_uncond.reshape(b, -1).to(up)
    s, w, wu = sign.to(up)[:, None], weight.to(up)[:, None], uncond_weight.to(up)[:, None]
    diff_c = pc - (tu + (s * eta) * (tc - tu))
    loss = (w * diff_c.square()).sum() / max(n, 1)
    grad_c = ((2.0 / max(n, 1)) * w * diff_c).to(pred_cond.dtype).view_as(pred_cond)
    if pred_uncond is None:
        return loss, grad_c, pred_cond.new_empty(0)
    diff_u = pred_uncond.reshape(b, -1).to(up) - tu
    loss = loss + (wu * diff_u.square()).sum() / max(n, 1)
    grad_u = ((2.0 / max(n, 1)) * wu * diff_u).to(pred_uncond.dtype).view_as(pred_uncond)
    return loss, grad_c, grad_u


class _PairedNoiseLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients; backward only scales the stored gradients."""

    @staticmethod
    def forward(ctx, pred_cond, pred_uncond, teacher_cond, teacher_uncond, sign, weight, uncond_weight, eta):
        loss, grad_c, grad_u = torch.ops.fasterase.paired_noise_loss(
            pred_cond, pred_uncond, teacher_cond, teacher_uncond, sign, weight, uncond_weight, eta)
        ctx.has_uncond = pred_uncond is not None
        ctx.save_for_backward(grad_c, grad_u)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_c, grad_u = ctx.saved_tensors
        # loss.backward() seeds 1: then the stored gradients are the answer and the pass that would scale
        # them (16 bytes per element, two thirds of the forward's traffic) is skipped, at the price of
        # one host synchronisation, as Liger-Kernel's fused losses do. Autograd copies a returned tensor
        # it cannot steal, so accumulating into .grad never changes the stored ones.
        if bool(grad_loss == 1):
            return grad_c, grad_u if ctx.has_uncond else None, None, None, None, None, None, None
        gc = grad_c * grad_loss.to(grad_c.dtype)
        gu = grad_u * grad_loss.to(grad_u.dtype) if ctx.has_uncond else None
        return gc, gu, None, None, None, None, None, None


def _per_sample(name: str, value, b: int, default: float, device) -> torch.Tensor:
    if value is None:
        value = default
    if isinstance(value, (int, float)):
        return torch.full((b,), float(value), dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a tensor of shape ({b},), got {type(value).__name__}")
    if value.shape not in ((b,), ()):
        raise ValueError(f"{name} must have shape ({b},) (one per sample) or be a scalar, got {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.float32).expand(b).contiguous()


def paired_noise_loss(
    pred_cond: torch.Tensor,
    pred_uncond: Optional[torch.Tensor],
    teacher_cond: torch.Tensor,
    teacher_uncond: torch.Tensor,
    sign: torch.Tensor | float,
    eta: float = 1.0,
    weight: torch.Tensor | float | None = None,
    uncond_weight: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Weighted paired MSE of trainable predictions against frozen-teacher targets (scalar fp32, autograd).

    pred_cond / pred_uncond: the trainable model's conditional / unconditional predictions (B, ...),
    fp32/bf16/fp16, each its own; pred_uncond may be None (ESD trains the conditional branch only).
    teacher_cond / teacher_uncond: the frozen model's predictions, same shape and one dtype (of the three)
    for both, which may differ from the predictions' (no gradient flows).
    sign: per-sample +1 (keep: ANT's early preservation, t > t') or -1 (reverse: ESD / ANT's late
    erasure, t < t'); a float applies to all samples.  eta: guidance scale.
    weight / uncond_weight: per-sample weights of the conditional and unconditional terms; each
    defaults to 1/B, so the defaults give mse(pred_cond, target) + mse(pred_uncond, teacher_uncond).
    ANT eq. 3 with one early sample (sign +1) and one late sample (sign -1):
    weight = [1, lambda1], uncond_weight = [lambda2, lambda3].  Exact formula:
    :func:`paired_noise_loss_reference`.
    """
    tensors = {"pred_cond": pred_cond, "teacher_cond": teacher_cond, "teacher_uncond": teacher_uncond}
    if pred_uncond is not None:
        tensors["pred_uncond"] = pred_uncond
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; valid: {', '.join(map(str, _DTYPES))}")
        if t.shape != pred_cond.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, pred_cond has {tuple(pred_cond.shape)}")
        if t.device != pred_cond.device:
            raise ValueError(f"{name} is on {t.device}, pred_cond on {pred_cond.device}")
    if teacher_uncond.dtype != teacher_cond.dtype:
        # one frozen model gives both; the native kernels take one teacher dtype (a fourth dtype dimension
        # of CUDA instantiations would buy nothing), so every backend refuses a mix alike
        raise TypeError(f"teacher_cond ({teacher_cond.dtype}) and teacher_uncond ({teacher_uncond.dtype}) must "
                        f"share a dtype (any of {', '.join(map(str, _DTYPES))})")
    if pred_cond.dim() < 1:
        raise ValueError("predictions need a leading batch dimension")
    b = pred_cond.shape[0]
    device = pred_cond.device
    sign_t = _per_sample("sign", sign, b, 1.0, device)
    weight_t = _per_sample("weight", weight, b, 1.0 / max(b, 1), device)
    uncond_t = _per_sample("uncond_weight", uncond_weight, b, 1.0 / max(b, 1), device)
    contiguous = [t.detach().contiguous() if t is not None else None
                  for t in (teacher_cond, teacher_uncond)]
    return _PairedNoiseLoss.apply(pred_cond.contiguous(), None if pred_uncond is None else pred_uncond.contiguous(),
                                  contiguous[0], contiguous[1], sign_t, weight_t, uncond_t, float(eta))
