"""Losses of the fine-tuning methods, against frozen-teacher targets under stop-gradient."""
from __future__ import annotations

import torch


def negative_guidance_loss(pred: torch.Tensor, teacher_cond: torch.Tensor, teacher_uncond: torch.Tensor,
                           eta: float) -> torch.Tensor:
    """ESD: mean squared error to teacher(empty) - eta * (teacher(concept) - teacher(empty))."""
    target = teacher_uncond - eta * (teacher_cond - teacher_uncond)
    return torch.nn.functional.mse_loss(pred, target.detach())
