"""The op boundary: fused ops with a pure-torch reference each, dispatched to the fastest verified backend.

Ops: :func:`masked_adamw` (and its list form :func:`masked_adamw_multi`), :func:`rank_one_update`, :func:`closed_form_update`,
:func:`paired_noise_loss`.  Backends: ``cuda`` and ``cpp`` (the compiled extension fasterase._C),
``triton`` (fasterase.kernels) and ``reference``; the automatic choice (:func:`default_backend`) takes
only backends verified on the device type.  Force one with FASTERASE_BACKEND or :func:`use_backend`;
:func:`last_backend` says which one an op used.
"""
from ._dispatch import BACKENDS, VERIFIED, available_backends, default_backend, last_backend, use_backend
from .adamw import masked_adamw, masked_adamw_multi, masked_adamw_multi_reference, masked_adamw_reference
from .noise_loss import paired_noise_loss, paired_noise_loss_reference
from .quant import (dequantize_blockwise, dynamic_map, mask_to_indices, num_blocks, pack_mask,
                    quantize_blockwise, unpack_mask)
from .rank_update import (closed_form_transform, closed_form_update, lowrank_update_reference,
                          rank_one_update, shared_matmul_reference)

__all__ = [
    "BACKENDS", "VERIFIED", "available_backends", "default_backend", "last_backend", "use_backend",
    "masked_adamw", "masked_adamw_reference", "masked_adamw_multi", "masked_adamw_multi_reference",
    "paired_noise_loss", "paired_noise_loss_reference",
    "rank_one_update", "closed_form_update", "closed_form_transform",
    "lowrank_update_reference", "shared_matmul_reference",
    "dynamic_map", "quantize_blockwise", "dequantize_blockwise", "num_blocks",
    "pack_mask", "unpack_mask", "mask_to_indices",
]
