"""Losses of the fine-tuning methods, against frozen-teacher targets (no gradient to them).

All go through the fused paired_noise_loss op, which computes the loss and its gradients in
one pass: target = teacher_uncond + sign * eta * (teacher_cond - teacher_uncond).
"""
from __future__ import annotations

import torch

from .. import ops


def negative_guidance_loss(pred: torch.Tensor, teacher_cond: torch.Tensor, teacher_uncond: torch.Tensor,
                           eta: float) -> torch.Tensor:
    """ESD: mean squared error to teacher(empty) - eta * (teacher(concept) - teacher(empty))."""
    return ops.paired_noise_loss(pred, None, teacher_cond.detach(), teacher_uncond.detach(), sign=-1.0, eta=eta)


def trajectory_aware_loss(pred_cond: torch.Tensor, pred_uncond: torch.Tensor, teacher_cond: torch.Tensor,
                          teacher_uncond: torch.Tensor, early: torch.Tensor, eta: float, lambda1: float,
                          lambda2: float, lambda3: float) -> torch.Tensor:
    """ANT eq. (3) over a batch of samples, each at an early (tau > t') or a late (tau < t') step.

    Early samples: |pred_c - sg[u* + eta (c* - u*)]|^2 + lambda2 |pred_u - sg[u*]|^2 (preserve).
    Late samples:  lambda1 |pred_c - sg[u* - eta (c* - u*)]|^2 + lambda3 |pred_u - sg[u*]|^2 (erase,
    condition direction reversed). Each expectation is the mean over its own samples; both
    unconditional predictions carry gradient. early: bool (B,).
    """
    early = early.to(dtype=torch.bool)
    n_early = int(early.sum())  # counted where the taus were drawn (the CPU): no wait on the GPU
    n_late = len(early) - n_early
    early = early.to(pred_cond.device)
    e = early.float()
    count = e * max(n_early, 1) + (1 - e) * max(n_late, 1)
    sign = 2 * e - 1
    weight = (e + (1 - e) * lambda1) / count
    uncond_weight = (e * lambda2 + (1 - e) * lambda3) / count
    return ops.paired_noise_loss(pred_cond, pred_uncond, teacher_cond.detach(), teacher_uncond.detach(), sign=sign,
                                 eta=eta, weight=weight, uncond_weight=uncond_weight)
