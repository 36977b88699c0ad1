"""Closed-form edits of the projections that read text (UCE; the fusion step of ANT/TRACE).

UCE for one layer W (out x in), erase pairs (c_i -> target W g_i), preserve inputs p_j:

    W' = argmin  es * sum_i |W' c_i - W g_i|^2 + ps * sum_j |W' p_j - W p_j|^2 + lam |W' - W|^2

This is the ops' closed form with sources [C; P], targets [G; P] and row weights [es; ps]:
W' = W T, where T depends only on the inputs, so every layer fed by the same inputs (all of SD's
to_k/to_v read the text encoder output) shares one solve and costs one matmul.
"""
from __future__ import annotations

import torch

from .. import ops


@torch.no_grad()
def uce_weights(weights: list[torch.Tensor], erase_in: torch.Tensor, guide_in: torch.Tensor,
                preserve_in: torch.Tensor, lam: float, erase_scale: float = 1.0,
                preserve_scale: float = 1.0) -> list[torch.Tensor]:
    """The edited values of `weights` (all fed by the same inputs); the weights themselves are
    left as they are. erase_in/guide_in: (n, in); preserve_in: (m, in), m may be 0."""
    if erase_in.shape != guide_in.shape or erase_in.dim() != 2:
        raise ValueError(f"erase and guide inputs must both be (n, in); got {tuple(erase_in.shape)} "
                         f"and {tuple(guide_in.shape)}")
    if preserve_in.dim() != 2 or preserve_in.shape[1] != erase_in.shape[1]:
        raise ValueError(f"preserve inputs must be (m, {erase_in.shape[1]}); got {tuple(preserve_in.shape)}")
    if lam <= 0 or erase_scale <= 0 or preserve_scale < 0:
        raise ValueError(f"need lam > 0, erase_scale > 0, preserve_scale >= 0; got {lam}, {erase_scale}, "
                         f"{preserve_scale}")
    n, m = erase_in.shape[0], preserve_in.shape[0]
    sources = torch.cat([erase_in, preserve_in]).float()
    targets = torch.cat([guide_in, preserve_in]).float()
    row_weights = torch.cat([torch.full((n,), float(erase_scale)), torch.full((m,), float(preserve_scale))])
    new = [w.detach().float().clone() for w in weights]
    ops.closed_form_update(new, sources, targets, lam=lam, row_weights=row_weights.to(sources.device))
    return [v.to(w.dtype) for v, w in zip(new, weights)]


@torch.no_grad()
def fuse_lora_deltas(weight: torch.Tensor, erase_in: list[torch.Tensor], deltas: list[torch.Tensor],
                     preserve_in: torch.Tensor | None, beta: float, lam: float) -> torch.Tensor:
    """MACE / ANT eq. (7): the W* minimising

        sum_i |W* E_i - (W + dW_i) E_i|^2 + beta |W* P - W P|^2 + lam |W* - W|^2

    for one projection W (out x in): erase_in[i] (n_i, in) are concept i's token inputs, deltas[i]
    its LoRA change (out x in), preserve_in (m, in) the prior-preservation tokens. Returns W*
    in W's dtype; W itself is left as it is.
    """
    if len(erase_in) != len(deltas) or not deltas:
        raise ValueError(f"need one LoRA change per concept's inputs; got {len(deltas)} and {len(erase_in)}")
    w = weight.detach().float()
    for d in deltas:
        if d.shape != w.shape:
            raise ValueError(f"a LoRA change has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
    sources = [e.float() for e in erase_in]
    values = [e @ (w + d.float()).t() for e, d in zip(sources, deltas)]
    scales = [torch.ones(len(e)) for e in sources]
    if preserve_in is not None and len(preserve_in):
        sources.append(preserve_in.float())
        values.append(preserve_in.float() @ w.t())
        scales.append(torch.full((len(preserve_in),), float(beta)))
    new = w.clone()
    ops.closed_form_update([new], torch.cat(sources), lam=lam, row_weights=torch.cat(scales).to(w.device),
                           values=[torch.cat(values)])
    return new.to(weight.dtype)
