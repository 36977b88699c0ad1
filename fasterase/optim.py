"""SalientAdamW: saliency-masked AdamW with 8-bit blockwise states (fused op fasterase.ops.masked_adamw,
one call per device for all parameters: fasterase.ops.masked_adamw_multi).

Only the selected entries of each parameter train; the others, and their states, are never
written.  With index masks (the default form of a bool mask) a tensor's states hold only its
selected entries and a tensor with no selected entry gets no state at all, so optimizer memory
is proportional to what is trained: 2 bytes per selected entry plus 8 bytes per 256 with 8-bit
states.  A step with a non-finite gradient anywhere is skipped for every parameter
(``last_step_skipped``), like torch.amp.GradScaler, without a host synchronisation.
"""
from __future__ import annotations

from itertools import chain
from typing import Iterable, Mapping, Optional

import torch

from . import ops

STATE_DTYPES = {"8bit": torch.uint8, "bf16": torch.bfloat16, "fp32": torch.float32}


def _normalise_mask(param: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """bool (param-shaped) -> sorted int32 indices; int32 indices and uint8 bitmasks are checked and kept."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"a mask must be a tensor, got {type(mask).__name__}")
    n = param.numel()
    if mask.dtype == torch.bool:
        if mask.numel() != n:
            raise ValueError(f"bool mask has {mask.numel()} entries, its parameter {n}")
        return ops.mask_to_indices(mask.to(param.device))
    if mask.dtype == torch.int32:
        idx = mask.reshape(-1).to(param.device).contiguous()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n or not bool((idx[1:] > idx[:-1]).all())):
            raise ValueError(f"index mask must be sorted, unique and within [0, {n})")
        return idx
    if mask.dtype == torch.uint8:
        if mask.numel() != (n + 7) // 8:
            raise ValueError(f"bitmask has {mask.numel()} bytes, expected ceil({n}/8) = {(n + 7) // 8}")
        return mask.reshape(-1).to(param.device).contiguous()
    raise TypeError(f"mask dtype {mask.dtype} is not valid: use bool, int32 indices or a uint8 bitmask")


class SalientAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias correction) restricted to per-parameter saliency masks.

    params: parameters or param groups (fp32/bf16, contiguous).  masks: {parameter: mask} with a
    bool mask of the parameter's shape (stored as sorted int32 indices: compact states), int32
    indices, or a uint8 bitmask (full-size states); parameters without a mask train fully.
    state_dtype: "8bit" (default; bitsandbytes blockwise format, see fasterase.ops.quant), "bf16"
    or "fp32"; tensors with fewer than ``min_8bit_size`` state entries keep fp32 states, as in
    bitsandbytes.  Backend: fasterase.ops dispatch (FASTERASE_BACKEND overrides).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        masks: Optional[Mapping[torch.Tensor, torch.Tensor]] = None,
        state_dtype: str = "8bit",
        min_8bit_size: int = 4096,
    ):
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype {state_dtype!r} is not valid; use one of {', '.join(STATE_DTYPES)}")
        if not (lr >= 0 and 0 <= betas[0] < 1 and 0 <= betas[1] < 1 and eps > 0 and weight_decay >= 0):
            raise ValueError(f"need lr >= 0, 0 <= betas < 1, eps > 0, weight_decay >= 0; got "
                             f"lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.state_dtype = state_dtype
        self.min_8bit_size = min_8bit_size
        self.masks: dict[torch.Tensor, torch.Tensor] = {}
        known = {p for group in self.param_groups for p in group["params"]}
        for p in known:
            if p.dtype not in (torch.float32, torch.bfloat16):
                raise TypeError(f"SalientAdamW trains fp32 or bf16 parameters, got {p.dtype}")
        for p, mask in (masks or {}).items():
            if p not in known:
                raise ValueError("masks has a tensor that is not one of the optimizer's parameters")
            self.masks[p] = _normalise_mask(p, mask)
        self._found_inf: Optional[torch.Tensor] = None

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last step() was skipped because of a non-finite gradient (synchronises)."""
        return self._found_inf is not None and bool(self._found_inf.item() != 0)

    def _state_length(self, p: torch.Tensor) -> int:
        mask = self.masks.get(p)
        return mask.numel() if mask is not None and mask.dtype == torch.int32 else p.numel()

    def _init_state(self, p: torch.Tensor) -> dict:
        length = self._state_length(p)
        dtype = STATE_DTYPES[self.state_dtype]
        if dtype == torch.uint8 and length < self.min_8bit_size:
            dtype = torch.float32
        state = self.state[p]
        state["step"] = torch.zeros(1, dtype=torch.float32, device=p.device)
        if dtype == torch.uint8:
            # code 127 of the signed map and code 0 of the unsigned map are both exactly 0.0
            state["exp_avg"] = torch.full((length,), 127, dtype=torch.uint8, device=p.device)
            state["exp_avg_sq"] = torch.zeros(length, dtype=torch.uint8, device=p.device)
            state["absmax_m"] = torch.zeros(ops.num_blocks(length), dtype=torch.float32, device=p.device)
            state["absmax_v"] = torch.zeros(ops.num_blocks(length), dtype=torch.float32, device=p.device)
        else:
            state["exp_avg"] = torch.zeros(length, dtype=dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(length, dtype=dtype, device=p.device)
        if p in self.masks:
            state["mask"] = self.masks[p]
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or self._state_length(p) == 0:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("SalientAdamW does not support sparse gradients")
                if not p.is_contiguous():
                    raise ValueError("SalientAdamW needs contiguous parameters")
                work.append((group, p))
        if not work:
            return loss
        by_device: dict[torch.device, list] = {}
        for group, p in work:
            by_device.setdefault(p.device, []).append((group, p))
        # one call per device (ops.masked_adamw_multi): it checks every gradient first, so a step with
        # a non-finite gradient anywhere on the device is skipped for all of its parameters; over
        # several devices one flag, set from every device's gradients first, skips it on all of them
        shared = None
        if len(by_device) > 1:
            first = next(iter(by_device))
            shared = torch.zeros(1, dtype=torch.float32, device=first)
            for items in by_device.values():
                bad = torch.stack([(~torch.isfinite(p.grad)).any() for _, p in items]).any()
                shared.masked_fill_(bad.to(first), 1.0)
        flags = []
        for device, items in by_device.items():
            params, grads, exp_avgs, exp_avg_sqs, steps, masks, absmax = [], [], [], [], [], [], []
            lrs, betas, epss, decays = [], [], [], []
            for group, p in items:
                state = self.state[p] if self.state[p] else self._init_state(p)
                params.append(p.view(-1))
                grads.append(p.grad.contiguous().view(-1))
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                steps.append(state["step"])
                masks.append(self.masks.get(p))
                absmax.append((state["absmax_m"], state["absmax_v"]) if "absmax_m" in state else None)
                lrs.append(group["lr"])
                betas.append(group["betas"])
                epss.append(group["eps"])
                decays.append(group["weight_decay"])
            flags.append(ops.masked_adamw_multi(params, grads, exp_avgs, exp_avg_sqs, steps, lr=lrs, betas=betas,
                                                eps=epss, weight_decay=decays, masks=masks, absmax=absmax,
                                                found_inf=None if shared is None else shared.to(device, copy=True)))
        self._found_inf = flags[0] if shared is None else shared
        return loss

    def state_bytes(self) -> int:
        """Bytes held by optimizer states (masks excluded)."""
        return sum(t.numel() * t.element_size() for s in self.state.values()
                   for k, t in s.items() if k != "mask" and isinstance(t, torch.Tensor))

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load, keeping the saved state dtypes (torch would cast 8-bit codes to the param dtype)."""
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        if len(saved_ids) != len(params):
            raise ValueError(f"state_dict has {len(saved_ids)} parameters, the optimizer {len(params)}")
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            if "mask" in saved:
                mask = saved["mask"].to(p.device)
                if p in self.masks and not torch.equal(self.masks[p], mask):
                    raise ValueError("a saved mask differs from the optimizer's mask for the same parameter")
                self.masks[p] = mask
            elif p in self.masks:
                raise ValueError("the optimizer masks a parameter the saved state trained fully")
            if saved["exp_avg"].numel() != self._state_length(p):
                raise ValueError(f"saved state has {saved['exp_avg'].numel()} entries, parameter expects "
                                 f"{self._state_length(p)}")
        super().load_state_dict(state_dict)
        for pid, p in zip(saved_ids, params):
            saved = state_dict["state"].get(pid)
            if saved is not None:
                self.state[p] = {k: v.to(p.device).clone() if isinstance(v, torch.Tensor) else v
                                 for k, v in saved.items()}
                if "mask" in self.state[p]:
                    self.state[p]["mask"] = self.masks[p]
