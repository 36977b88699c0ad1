"""Batched low-rank and closed-form edits of key/value projection matrices.

Two in-place ops over a list of weights W (out x in, fp32/bf16/fp16), grouped by shape so a
backend runs one launch per group:

* ``fasterase::lowrank_update``: W += (W @ left^T) @ right for every W, with ``left`` and
  ``right`` fp32 of shape (k, in) shared by all W or (len(weights), k, in) per weight.  Each row
  of W only needs its own k dot products, so kernels read and write W once.
  :func:`rank_one_update` builds left/right for TRACE eq. 1 (k concepts: the joint solve).
* ``fasterase::shared_matmul``: W <- W @ T (+ A_W) for every W, T fp32 (in x in), fp32 addends
  A_W (out x in), one per weight, or an empty list.
  :func:`closed_form_update` builds T for the UCE/MACE closed form once per input width.

Both compute in fp32 and round the result to W's dtype.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import torch

from . import _dispatch
from ._overlap import check_disjoint

_W_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_RANK = 64  # rows of left/right per call (the CUDA kernel keeps the dots in shared memory)


@torch.library.custom_op("fasterase::lowrank_update", mutates_args=("weights",))
def _lowrank_op(weights: list[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> None:
    backend = _dispatch.select("rank_one_update", weights[0].device)
    if backend == "reference":
        lowrank_update_reference(weights, left, right)
    elif backend == "triton":
        with _dispatch.on_device(weights[0].device):
            _dispatch.triton_kernels().lowrank_update(weights, left, right)
    else:
        _dispatch.native().lowrank_update(weights, left, right)


@_lowrank_op.register_fake
def _(weights, left, right):
    return None


@torch.library.custom_op("fasterase::shared_matmul", mutates_args=("weights",))
def _shared_matmul_op(
    weights: list[torch.Tensor], transform: torch.Tensor, addends: list[torch.Tensor]
) -> None:
    backend = _dispatch.select("closed_form_update", weights[0].device)
    if backend == "reference":
        shared_matmul_reference(weights, transform, addends)
    elif backend == "triton":
        with _dispatch.on_device(weights[0].device):
            _dispatch.triton_kernels().shared_matmul(weights, transform, addends)
    else:
        _dispatch.native().shared_matmul(weights, transform, addends)


@_shared_matmul_op.register_fake
def _(weights, transform, addends):
    return None


def lowrank_update_reference(weights: list[torch.Tensor], left: torch.Tensor, right: torch.Tensor) -> None:
    """W += (W @ left^T) @ right, in fp32, for each W (left/right shared or indexed per weight)."""
    for i, w in enumerate(weights):
        lw = left if left.dim() == 2 else left[i]
        rw = right if right.dim() == 2 else right[i]
        wf = w.double() if w.dtype == torch.float64 else w.float()  # fp64: the tests' oracle
        w.copy_(wf + (wf @ lw.to(wf.dtype).t()) @ rw.to(wf.dtype))


def shared_matmul_reference(weights: list[torch.Tensor], transform: torch.Tensor, addends: list[torch.Tensor]) -> None:
    """W <- W @ T (+ addends[i] when addends is not empty), in fp32, for each W."""
    for i, w in enumerate(weights):
        wf = w.double() if w.dtype == torch.float64 else w.float()  # fp64: the tests' oracle
        out = wf @ transform.to(wf.dtype)
        w.copy_(out + addends[i].to(wf.dtype) if addends else out)


def _validate_weights(weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    weights = list(weights)
    if not weights:
        raise ValueError("weights is empty")
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise ValueError(f"weights[{i}] must be a 2-D tensor (out x in)")
        if w.dtype not in _W_DTYPES:
            raise TypeError(f"weights[{i}] has dtype {w.dtype}; valid: {', '.join(map(str, _W_DTYPES))}")
        if not w.is_contiguous():
            raise ValueError(f"weights[{i}] must be contiguous")
        if w.device != weights[0].device:
            raise ValueError(f"weights[{i}] is on {w.device}, weights[0] on {weights[0].device}")
    check_disjoint([(f"weights[{i}]", w) for i, w in enumerate(weights)])
    return weights


def _groups(weights: list[torch.Tensor], key) -> dict:
    groups = defaultdict(list)
    for i, w in enumerate(weights):
        groups[key(w)].append(i)
    return groups


def _check_finite(name: str, t: torch.Tensor) -> None:
    """The updates write every weight in place: one NaN or inf in what they read would reach them all."""
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite entries (NaN or inf); the update needs finite inputs")


@torch.no_grad()
def rank_one_update(
    weights: Sequence[torch.Tensor],
    e_u: torch.Tensor | Sequence[torch.Tensor],
    e_w: torch.Tensor | Sequence[torch.Tensor],
    eta: float = 1.0,
) -> None:
    """TRACE eq. 1 on every weight, in place: W += eta * W (e_u - e_w) e_w^T / ||e_w||^2.

    ``e_u``/``e_w``: (in,) or (k, in) embeddings shared by every weight of that input width, or a
    sequence with one (in,)/(k, in) tensor per weight (e.g. FLUX, whose K/V inputs differ per
    block).  Row j of e_w is an erased concept's token embedding, row j of e_u its replacement.
    With k rows the update is the joint solve that TRACE Sec. 4.3 allows for several concepts,
    W += eta * W (E_u - E_w)^T G^-1 E_w with G = E_w E_w^T (k x k): at eta = 1 it maps every
    e_w_j exactly onto W e_u_j, where the plain sum of k eq.-1 updates would not (each e_w_j
    also moves under the others' updates unless the rows are orthogonal). For k = 1 it is eq. 1.

    Raises ValueError for mismatched shapes, no rows or more than MAX_RANK, NaN or inf in eta or the
    embeddings, or e_w rows that are not linearly independent (G singular: two rows the same concept
    twice), all before any weight is written; TypeError for a dtype.
    """
    weights = _validate_weights(weights)
    if not math.isfinite(eta):
        raise ValueError(f"eta must be finite, got {eta}")
    per_weight = not isinstance(e_u, torch.Tensor)
    if per_weight != (not isinstance(e_w, torch.Tensor)):
        raise TypeError("e_u and e_w must both be tensors or both be sequences (one per weight)")
    if per_weight and (len(e_u) != len(weights) or len(e_w) != len(weights)):
        raise ValueError(f"got {len(e_u)} e_u and {len(e_w)} e_w for {len(weights)} weights")

    def factors(u: torch.Tensor, w_: torch.Tensor, which: str = ""):
        if u.shape[-1] == 0 or w_.shape[-1] == 0:
            raise ValueError("e_u and e_w need a width of at least 1, got 0")
        u2, w2 = u.float().reshape(-1, u.shape[-1]), w_.float().reshape(-1, w_.shape[-1])
        if u2.shape != w2.shape:
            raise ValueError(f"e_u {tuple(u.shape)} and e_w {tuple(w_.shape)} differ in shape")
        _check_finite(f"e_u{which}", u2)
        _check_finite(f"e_w{which}", w2)
        if not 1 <= u2.shape[0] <= MAX_RANK:
            raise ValueError(f"1 to {MAX_RANK} embedding rows per call, got {u2.shape[0]}")
        if not bool(((w2 * w2).sum(dim=1) > 0).all()):
            raise ValueError("every e_w row needs a non-zero norm")
        w64 = w2.double()
        gram = w64 @ w64.t()
        # relative to the rows' own scale: a Gram this close to singular makes G^-1 E_w meaningless
        if torch.linalg.matrix_rank(gram, rtol=1e-10).item() < len(gram):
            raise ValueError(f"the {len(gram)} e_w rows are not linearly independent; give each concept "
                             "token once")
        return u2 - w2, (eta * torch.linalg.solve(gram, w64)).float()

    shared = {} if per_weight else {e_u.shape[-1]: factors(e_u, e_w)}
    launches = []  # every input checked before the first weight is written
    for idx in _groups(weights, lambda w: (w.shape, w.dtype)).values():
        ws = [weights[i] for i in idx]
        width = ws[0].shape[1]
        if per_weight:
            pairs = [factors(e_u[i], e_w[i], f"[{i}]") for i in idx]
            if any(l.shape[1] != width for l, _ in pairs) or len({l.shape[0] for l, _ in pairs}) != 1:
                raise ValueError(f"per-weight embeddings for width {width} must all be (k, {width}) with one k")
            left = torch.stack([l for l, _ in pairs]).to(ws[0].device)
            right = torch.stack([r for _, r in pairs]).to(ws[0].device)
        else:
            if width not in shared:
                raise ValueError(f"embeddings have width {e_u.shape[-1]}, a weight has input width {width}")
            left, right = (t.to(ws[0].device) for t in shared[width])
        launches.append((ws, left.contiguous(), right.contiguous()))
    for ws, left, right in launches:
        torch.ops.fasterase.lowrank_update(ws, left, right)


def _erase_projection(sources: torch.Tensor, lam: float, row_weights: Optional[torch.Tensor]) -> torch.Tensor:
    """R = D C M^-1 (fp64, n x in), M = lam I + C^T D C: the one solve of the closed form.

    With n rows of C narrower than in, the push-through identity C M^-1 = (lam I + C C^T D)^-1 C
    turns the (in x in) system into an (n x n) one: for UCE's tens of embeddings against SD1.5's
    768 or FLUX's 4096-wide inputs, the solve costs nothing beside the weights' update.
    """
    if sources.dim() != 2:
        raise ValueError(f"sources must be (n, in), got {tuple(sources.shape)}")
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be finite and > 0 (it keeps the system invertible), got {lam}")
    c = sources.double()
    n, width = c.shape
    d = torch.ones(n, dtype=torch.float64, device=c.device) if row_weights is None else row_weights.double()
    if d.shape != (n,):
        raise ValueError(f"row_weights must have shape ({n},), got {tuple(d.shape)}")
    _check_finite("sources", c)
    _check_finite("row_weights", d)
    if n < width:
        small = lam * torch.eye(n, dtype=torch.float64, device=c.device) + (c @ c.t()) * d[None, :]
        return d[:, None] * torch.linalg.solve(small, c)
    big = lam * torch.eye(width, dtype=torch.float64, device=c.device) + (c * d[:, None]).t() @ c
    return torch.linalg.solve(big, (c * d[:, None]).t()).t()  # M is symmetric: (M^-1 C^T D)^T


def closed_form_transform(
    sources: torch.Tensor,
    targets: torch.Tensor,
    lam: float,
    row_weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """T = (lam I + C*^T D C)(lam I + C^T D C)^-1 (fp32, in x in), computed in fp64.

    With v_i = W c*_i, the UCE/MACE update W <- (lam W + sum_i d_i v_i c_i^T)(lam I + sum_i d_i c_i c_i^T)^-1
    equals W @ T for every layer reading the same input width; preserved concepts use c* = c.  Since
    lam M^-1 = I - C^T D C M^-1, T = I + (C* - C)^T R with R = D C M^-1 (:func:`_erase_projection`).
    """
    if targets.shape != sources.shape:
        raise ValueError(f"targets {tuple(targets.shape)} must match sources {tuple(sources.shape)}")
    _check_finite("targets", targets)
    r = _erase_projection(sources, lam, row_weights)
    eye = torch.eye(r.shape[1], dtype=torch.float64, device=r.device)
    return (eye + (targets.double() - sources.double()).t() @ r).float().contiguous()


@torch.no_grad()
def closed_form_update(
    weights: Sequence[torch.Tensor],
    sources: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
    lam: float = 0.1,
    row_weights: Optional[torch.Tensor] = None,
    values: Optional[Sequence[torch.Tensor]] = None,
) -> None:
    """UCE/MACE closed form on every weight, in place: W <- (lam W + sum_i d_i v_i c_i^T) M^-1, M = lam I + sum_i d_i c_i c_i^T.

    sources (n, in): embeddings c_i; row_weights (n,): d_i (UCE's erase/preserve scales, default 1).
    Give exactly one of
      targets (n, in): v_i = W c*_i from the current W (UCE: c*_i the anchor's embedding, c*_i = c_i
        to preserve); then W <- W @ T with one T for all weights (:func:`closed_form_transform`);
      values: one (n, out) tensor per weight, its v_i (MACE fusing per-concept LoRAs: v_i = W_i' c_i);
        then W <- W @ (lam M^-1) + V^T (D C M^-1).
    M is solved once (fp64, as an n x n system when n < in) and shared by every weight; one launch per
    weight shape. Raises ValueError for mismatched shapes, lam not finite and > 0, or NaN or inf in what
    it reads (checked before any weight is written).
    """
    weights = _validate_weights(weights)
    if (targets is None) == (values is None):
        raise ValueError("give exactly one of targets (v_i = W c*_i) or values (explicit v_i per weight)")
    if targets is not None:
        transform = closed_form_transform(sources, targets, lam, row_weights)
        extra = None
    else:
        r = _erase_projection(sources, lam, row_weights)  # lam M^-1 = I - C^T R
        eye = torch.eye(r.shape[1], dtype=torch.float64, device=r.device)
        transform = (eye - sources.double().t() @ r).float().contiguous()
        values = list(values)
        if len(values) != len(weights):
            raise ValueError(f"got {len(values)} values for {len(weights)} weights")
        for i, (v, w) in enumerate(zip(values, weights)):
            if not isinstance(v, torch.Tensor) or not v.is_floating_point():
                raise TypeError(f"values[{i}] must be a floating-point tensor")
            if v.shape != (r.shape[0], w.shape[0]):
                raise ValueError(f"values[{i}] must be (n={r.shape[0]}, out={w.shape[0]}), got {tuple(v.shape)}")
            if v.device != w.device:  # its addend is read by the weight's kernel, on the weight's device
                raise ValueError(f"values[{i}] is on {v.device}, weights[{i}] on {w.device}")
            _check_finite(f"values[{i}]", v)
        # V^T (D C M^-1) in fp64 like the solve (n terms per entry: cheap), so no fp32 matmul setting
        # (TF32, oneDNN bf16) touches it
        extra = [(v.double().t() @ r.to(v.device)).float().contiguous() for v in values]
    for i, w in enumerate(weights):
        if w.shape[1] != transform.shape[0]:
            raise ValueError(f"weights[{i}] has input width {w.shape[1]}, embeddings have {transform.shape[0]}")
    for idx in _groups(weights, lambda w: (w.shape, w.dtype)).values():
        ws = [weights[i] for i in idx]
        if extra is None:
            torch.ops.fasterase.shared_matmul(ws, transform.to(ws[0].device), [])
        else:
            torch.ops.fasterase.shared_matmul(ws, transform.to(ws[0].device), [extra[i] for i in idx])
