"""Concept saliency maps (ANT Sec. 3.3; FADE Sec. 4.3): which parameters a fine-tune may touch.

One gradient map g per (prompt, seed). An entry is salient in a map when |g| >= gamma * rms(g),
rms over all candidate parameters of that map, so gamma means the same on any model and loss
scale, and the largest gradients are the ones kept (eq. 4). M* is the intersection over all
maps (eq. 5). "Salient in every map" is "min over maps of |g| / rms(g) >= gamma", so one running
minimum per entry gives M* for any gamma, and the gamma that keeps a given number of entries
when a chosen gamma keeps none. M* is stored as sorted int32 indices per parameter.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UserError
from ..files import check_writable, full_disk_named, set_default_mode
from ..models.partitioned import release_leftovers


class EmptySaliencyMap(UserError):
    """The user's threshold selects no parameter in every map; the message says which would."""


def visit_gradients(loss: torch.Tensor, tensors: dict[str, torch.Tensor], visit, retain_graph: bool = False,
                    network: torch.nn.Module | None = None) -> None:
    """Back-propagate `loss` and call visit(name, gradient) for each of `tensors` (leaves that require
    grad, with no .grad) as soon as autograd has its gradient, which is then freed: one layer's
    gradient at a time, never a copy of every gradient. A tensor the loss does not reach is an error.
    `network`, the module the tensors are in: while ZeRO-3 partitions it, the layers the backward left
    gathered are freed after it (models/partitioned.release_leftovers)."""
    seen = set()

    def hook(name):
        def run(p):
            visit(name, p.grad)
            seen.add(name)
            p.grad = None
        return run

    handles = [p.register_post_accumulate_grad_hook(hook(n)) for n, p in tensors.items()]
    try:
        loss.backward(retain_graph=retain_graph)
    finally:
        for h in handles:
            h.remove()
        if network is not None:
            release_leftovers(network)
    missing = [n for n in tensors if n not in seen]
    if missing:
        raise ValueError(f"the loss does not depend on {len(missing)} of the tensors, e.g. {missing[0]}")


class SaliencyScore:
    """Running elementwise minimum over gradient maps of |g| / rms(g), held in each gradient's dtype
    (fp32 for an fp32 model: exact; bf16 for a bf16 one, which is its gradients' own precision)."""

    def __init__(self):
        self.score: dict[str, torch.Tensor] = {}
        self.maps = 0

    @staticmethod
    def map_rms(square_sums: list[torch.Tensor], total: int) -> torch.Tensor:
        """rms of one map from its tensors' sums of squared fp32 gradients, in the parameters' order."""
        rms = (sum(square_sums) / max(total, 1)).sqrt()
        if not torch.isfinite(rms):
            raise FloatingPointError("a gradient map is not finite; check the model and the loss")
        if rms == 0:
            raise ValueError("a gradient map is all zeros: the loss does not depend on these parameters")
        return rms

    @torch.no_grad()
    def update(self, name: str, g: torch.Tensor, rms: torch.Tensor) -> None:
        """Fold one tensor of a map into the score (count the map with end_map())."""
        r = (g.detach().float().abs() / rms).to(g.dtype)
        self.score[name] = r if name not in self.score else torch.minimum(self.score[name], r)

    def end_map(self) -> None:
        self.maps += 1

    @torch.no_grad()
    def add(self, grads: dict[str, torch.Tensor]) -> None:
        """One whole map."""
        if self.score and grads.keys() != self.score.keys():
            raise ValueError("every gradient map must cover the same parameters")
        rms = self.map_rms([g.float().square().sum() for g in grads.values()], sum(g.numel() for g in grads.values()))
        for name, g in grads.items():
            self.update(name, g, rms)
        self.end_map()

    @property
    def total(self) -> int:
        return sum(s.numel() for s in self.score.values())

    def mask(self, gamma: float) -> dict[str, torch.Tensor]:
        """M*: {name: sorted int32 indices of the entries salient in every map} (non-empty only)."""
        out = {}
        for name, s in self.score.items():
            idx = torch.nonzero(s.reshape(-1) >= gamma).reshape(-1).to(torch.int32)
            if idx.numel():
                out[name] = idx
        return out

    def threshold_keeping(self, k: int) -> float:
        """The largest gamma whose M* has at least k entries (the k-th largest score)."""
        return kth_largest(list(self.score.values()), k)


def kth_largest(tensors: list[torch.Tensor], k: int) -> float:
    """The k-th largest value over non-negative float tensors, exactly, without concatenating them.

    Non-negative floats order like their bit patterns as integers, so a binary search over the
    31-bit patterns with one counting pass each finds it.
    """
    total = sum(t.numel() for t in tensors)
    if not 1 <= k <= total:
        raise ValueError(f"k must be in [1, {total}], got {k}")
    lo, hi = 0, 0x7F800000  # +0.0 .. +inf as int32 bit patterns
    while lo < hi:  # largest bit pattern v with count(x >= v) >= k
        mid = (lo + hi + 1) // 2
        v = torch.tensor(mid, dtype=torch.int32).view(torch.float32).item()
        if sum(int((t >= v).sum()) for t in tensors) >= k:
            lo = mid
        else:
            hi = mid - 1
    return torch.tensor(lo, dtype=torch.int32).view(torch.float32).item()


def top_share(sums: dict[str, torch.Tensor], share: float) -> dict[str, torch.Tensor]:
    """FADE's salient set (Sec. 4.3): the entries with the largest summed |gradient|, a `share` of all
    of them (ties at the threshold kept; never an entry whose gradient was always zero), as sorted
    int32 indices per parameter (non-empty only)."""
    total = sum(s.numel() for s in sums.values())
    threshold = kth_largest(list(sums.values()), max(1, round(share * total)))
    out = {}
    for name, s in sums.items():
        keep = s.reshape(-1) >= threshold if threshold > 0 else s.reshape(-1) > 0
        idx = torch.nonzero(keep).reshape(-1).to(torch.int32)
        if idx.numel():
            out[name] = idx
    if not out:
        raise ValueError("every gradient of the saliency loss is zero: it does not depend on the network")
    return out


def selected(mask: dict[str, torch.Tensor]) -> int:
    return sum(idx.numel() for idx in mask.values())


def check_not_empty(score: SaliencyScore, gamma: float, option: str) -> dict[str, torch.Tensor]:
    """M* for gamma, or an EmptySaliencyMap that says which gamma would keep something."""
    mask = score.mask(gamma)
    if mask:
        return mask
    top = score.threshold_keeping(1)
    keep = max(1, score.total // 1000)
    raise EmptySaliencyMap(
        f"{option}={gamma:g} leaves the saliency map M* empty: no parameter's gradient reaches {gamma:g} x its "
        f"map's RMS in all {score.maps} maps. The largest value that keeps any is {top:.4g}; "
        f"{option}={score.threshold_keeping(keep):.4g} keeps about 0.1% ({keep} of {score.total}).")


def cache_dir() -> Path:
    """Where saliency maps are cached: $FASTERASE_CACHE, else ~/.cache/fasterase."""
    root = os.environ.get("FASTERASE_CACHE") or Path.home() / ".cache" / "fasterase"
    return Path(root) / "saliency"


def check_cache() -> Path:
    """cache_dir(), checked before any map is computed (minutes on a real model): a folder, or one that can
    be made, that can be written in; UserError otherwise."""
    folder = cache_dir()
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise UserError(f"saliency map cache {folder} ($FASTERASE_CACHE): {blocker} is a file, not a folder; set "
                        "FASTERASE_CACHE to a folder")
    check_writable(folder, f"saliency map cache {folder} ($FASTERASE_CACHE)")
    return folder


def save_mask(path: Path, mask: dict[str, torch.Tensor], meta: dict) -> None:
    """M* as int32 indices in safetensors, written to a temporary file and renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with full_disk_named(path.parent, f"saliency map cache {path} ($FASTERASE_CACHE)"):
            save_file({k: v.contiguous().cpu() for k, v in mask.items()}, tmp,
                      metadata={"fasterase_saliency": json.dumps(meta)})
        set_default_mode(Path(tmp))  # mkstemp's 0600: the file follows the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_mask(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("fasterase_saliency", "{}"))
        return {k: f.get_tensor(k) for k in f.keys()}, meta
