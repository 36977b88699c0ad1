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
