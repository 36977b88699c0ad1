"""Triton kernels of fasterase (installed as fasterase.kernels); the specifications are in fasterase/ops.

Each wrapper takes the same arguments as the op's reference.  On the CPU they run only under
TRITON_INTERPRET=1, which must be set before this package is imported.
"""
from .masked_adamw import masked_adamw
from .paired_noise_loss import paired_noise_loss
from .rank_update import lowrank_update, shared_matmul

__all__ = ["masked_adamw", "lowrank_update", "shared_matmul", "paired_noise_loss"]
