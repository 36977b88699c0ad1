"""Closed-form edits of the projections that read text (UCE; the fusion step of ANT/TRACE).

UCE for one layer W (out x in), erase pairs (c_i -> target W g_i), preserve inputs p_j:

    W' = argmin  es * sum_i |W' c_i - W g_i|^2 + ps * sum_j |W' p_j - W p_j|^2 + lam |W' - W|^2
       = W (es G^T C + ps P^T P + lam I) (es C^T C + ps P^T P + lam I)^-1  =  W R

(rows of C, G, P are the c_i, g_i, p_j). R depends only on the inputs, so every layer fed by the
same inputs (all of SD's to_k/to_v read the text encoder output) shares one R: the solve is done
once per input group and each layer costs one matmul.
"""
from __future__ import annotations

import torch


def uce_right_factor(erase_in: torch.Tensor, guide_in: torch.Tensor, preserve_in: torch.Tensor,
                     lam: float, erase_scale: float = 1.0, preserve_scale: float = 1.0) -> torch.Tensor:
    """R (in x in) of W' = W R, solved in fp64 and returned in fp32.

    erase_in, guide_in: (n, in) concept inputs and the guide inputs they are mapped to.
    preserve_in: (m, in) inputs whose outputs are kept (m may be 0).
    """
    if erase_in.shape != guide_in.shape or erase_in.dim() != 2:
        raise ValueError(f"erase and guide inputs must both be (n, in); got {tuple(erase_in.shape)} "
                         f"and {tuple(guide_in.shape)}")
    if preserve_in.dim() != 2 or preserve_in.shape[1] != erase_in.shape[1]:
        raise ValueError(f"preserve inputs must be (m, {erase_in.shape[1]}); got {tuple(preserve_in.shape)}")
    if lam < 0 or erase_scale <= 0 or preserve_scale < 0:
        raise ValueError(f"need lam >= 0, erase_scale > 0, preserve_scale >= 0; got {lam}, {erase_scale}, "
                         f"{preserve_scale}")
    c, g, p = (x.detach().double() for x in (erase_in, guide_in, preserve_in))
    eye = torch.eye(c.shape[1], dtype=torch.float64, device=c.device)
    kept = preserve_scale * p.T @ p + lam * eye
    a = erase_scale * c.T @ c + kept
    m = erase_scale * g.T @ c + kept
    # R = M A^-1  <=>  A^T R^T = M^T ; A is symmetric
    return torch.linalg.solve(a, m.T).T.float()


@torch.no_grad()
def apply_right_factor(weights: list[torch.Tensor], r: torch.Tensor) -> list[torch.Tensor]:
    """W R for every W of one input group, computed in fp32, returned in each W's dtype."""
    return [(w.float() @ r.to(w.device)).to(w.dtype) for w in weights]
