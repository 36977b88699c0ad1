"""Trainable parametrizations over a frozen base, each of which can be switched off.

Switched off, the network is the original model: that is the frozen teacher of every
fine-tuning method, so no second copy of a 12B network is ever made.
"""
from __future__ import annotations

import contextlib
import re

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

from ..edit import ADAPTER, base_param, base_parameters, check_lora_layers
from ..models import partitioned
from ..notices import second_adapter


# The layers a LoRA can cover (peft, and diffusers' load_lora_weights): every weight layer of SD
# UNets and FLUX transformers is one of these.
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def layer_names(network: torch.nn.Module, pattern: str, exclude: bool = False) -> list[str]:
    """Names of the linear and convolution layers whose whole name matches the regular expression
    (anchored: a name that merely contains a match does not count); with exclude, the others."""
    rx = re.compile(pattern)
    wrapped = {n for n, m in network.named_modules() if isinstance(m, BaseTunerLayer)}  # by an applied LoRA edit
    names = [n for n, m in network.named_modules()
             if (isinstance(m, LORA_LAYERS) or n in wrapped) and bool(rx.fullmatch(n)) != exclude
             and not any(n.startswith(f"{w}.") for w in wrapped)]  # not the LoRA layers' own parts
    if not names:
        raise ValueError(f"no layer of {type(network).__name__} {'is outside' if exclude else 'matches'} {pattern!r}")
    return names


def add_lora(network: torch.nn.Module, modules: list[str], rank: int, init_seed: int,
             adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    """A fresh LoRA adapter named `adapter` (alpha = rank, so diffusers loads it with the same scale)
    on `modules`, active beside the adapters already on; the base is frozen and only this adapter's
    factors train (earlier trained adapters are frozen too), held in fp32 whatever the base's dtype
    (peft computes them in fp32 and casts the sum back). Returns them."""
    check_lora_layers(network, adds_lora=True)  # a user's LoRA layers switched off: this one would not act
    if adapter in getattr(network, "peft_config", {}):
        raise RuntimeError(f"the network already carries a {adapter!r} adapter; remove that edit first")
    active = network.active_adapters() if getattr(network, "peft_config", {}) else []
    # LoRA init draws from the global generator; under ZeRO-3 peft reads only the covered weights' shapes
    with torch.random.fork_rng(), partitioned.shaped([network.get_submodule(m).weight for m in modules]), \
            second_adapter():
        torch.manual_seed(init_seed)
        network.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules, init_lora_weights=True),
                            adapter_name=adapter)
    if active:  # adding activates only the new adapter: the applied edits' adapters stay on
        network.set_adapter(active + [adapter])
    network.requires_grad_(False)
    params = [p for n, p in network.named_parameters() if f".{adapter}." in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


@contextlib.contextmanager
def lora_off(network: torch.nn.Module, adapters: tuple[str, ...] = (ADAPTER,)):
    """The frozen teacher: the network as it came, i.e. with the adapters being trained switched
    off. Edits applied before stay on, so erasing on top of an edit keeps that edit in the teacher."""
    active = network.active_adapters()
    others = [a for a in active if a not in adapters]
    grads = {p: p.requires_grad for n, p in network.named_parameters() if ".lora_" in n}  # set_adapter resets them
    if others:
        network.set_adapter(others)
    else:
        network.disable_adapters()
    try:
        yield
    finally:
        if others:
            network.set_adapter(active)
        else:
            network.enable_adapters()
        for p, flag in grads.items():
            p.requires_grad_(flag)


def lora_state(network: torch.nn.Module, prefix: str, adapters: tuple[str, ...] = (ADAPTER,)) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA format (keys prefixed "unet." or "transformer."), as one
    adapter: several (all alpha = rank, on the same modules) are joined along the rank, A's rows
    and B's columns concatenated, which adds their changes B_k A_k exactly."""
    states = [get_peft_model_state_dict(network, adapter_name=a) for a in adapters]
    if any(set(s) != set(states[0]) for s in states):
        raise ValueError(f"adapters {adapters} do not cover the same modules")
    dim = {"lora_A": 0, "lora_B": 1}
    return {f"{prefix}.{k}": torch.cat([s[k].detach() for s in states], dim=dim[k.split(".")[-2]]).clone()
            for k in states[0]}


class CompactDelta:
    """A fine-tune of selected entries of some parameters, held as compact fp32 masters over the
    frozen base, that can be switched off.

    For each touched parameter W (any float dtype) it keeps the sorted indices of its selected
    entries, their base values and `values`, one fp32 parameter of just those entries: what the
    optimizer trains (so gradients, optimizer states and checkpoints scale with the selected entries,
    and a bf16 base loses no small update). The network computes with W itself, whose selected
    entries hold `values` rounded to W's dtype (sync(), which the training loop calls after every
    optimizer step). Autograd computes W's gradient one layer at a time; a hook gathers its selected entries
    into values.grad and frees it at once, so no whole-network gradient is ever held.

    `off()` puts the base values in (the frozen teacher), `restore()` leaves the network
    bit-identical to how it came. masks: {parameter name: sorted int32 indices into the flattened
    parameter, or None for every entry (the methods' saliency=False: no index is held)}, kept as int32.
    Per selected entry: 4 bytes of index (none for a whole parameter), its base value, 4 of master and
    4 of gradient (and the optimizer's states).
    """

    def __init__(self, network: torch.nn.Module, masks: dict[str, torch.Tensor]):
        # in the network's order, whatever the masks' (a cached saliency map's is its file's): the trainable
        # tensors, and so a checkpoint of them, are the same for a map computed or read
        order = {n: i for i, n in enumerate(base_parameters(network))}
        names = sorted(masks, key=lambda n: order.get(n, len(order)))
        self.weights = {n: base_param(network, n) for n in names if masks[n] is None or masks[n].numel()}
        self.indices = {n: None if masks[n] is None else masks[n].to(w.device, torch.int32)
                        for n, w in self.weights.items()}
        self.base = {}
        for n, w in self.weights.items():
            with partitioned.gathered([w]):
                flat = w.detach().view(-1)
                self.base[n] = (flat if self.indices[n] is None else flat[self.indices[n]]).clone()
        self.values = {n: torch.nn.Parameter(b.to(torch.float32, copy=True)) for n, b in self.base.items()}
        self.runs = {n: slice_run(w, self.indices[n]) for n, w in self.weights.items()}  # ZeRO-3: found once
        network.requires_grad_(False)
        self._hooks = []
        for n, w in self.weights.items():
            w.requires_grad_(True)
            self._hooks.append(w.register_post_accumulate_grad_hook(self._gather(n)))

    def _gather(self, name: str):
        def hook(w: torch.Tensor) -> None:
            grad = w.grad.reshape(-1) if self.indices[name] is None else w.grad.reshape(-1)[self.indices[name]]
            grad = grad.float()
            master = self.values[name]
            master.grad = grad if master.grad is None else master.grad.add_(grad)
            w.grad = None
        return hook

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        """The fp32 masters, one per touched parameter, for the optimizer."""
        return list(self.values.values())

    @torch.no_grad()
    def _put(self, values: dict[str, torch.Tensor]) -> None:
        for n, w in self.weights.items():
            put_entries(w, self.indices[n], values[n], self.runs[n])

    def sync(self) -> None:
        """The network computes with the masters (rounded to each parameter's dtype)."""
        self._put({n: v.detach() for n, v in self.values.items()})

    def current(self) -> dict[str, torch.Tensor]:
        """The trained values of the selected entries, in their parameters' dtypes."""
        return {n: v.detach().to(self.weights[n].dtype).clone() for n, v in self.values.items()}

    @property
    def entries(self) -> int:
        """How many entries train."""
        return sum(v.numel() for v in self.values.values())

    def edit_parts(self, values: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """`values` (current()) as an Edit's parts, after restore(): `entries` {name: (int32 indices,
        values)} for a tensor whose selected entries' indices and values take fewer bytes than its values, and
        `weights` {name: whole tensor in its shape, the base values with the trained ones put in} for the
        others (every entry trained; or over a third of a bf16 tensor's entries, half an fp32's: an
        ANT map can select that much, and the edit would be larger than the weights it changes)."""
        weights, entries = {}, {}
        for n, v in values.items():
            w, idx = self.weights[n], self.indices[n]
            if idx is not None and idx.numel() * (4 + v.element_size()) < partitioned.numel(w) * v.element_size():
                entries[n] = (idx, v)
                continue
            if idx is None:
                whole = v
            else:
                with partitioned.gathered([w]):
                    whole = w.detach().reshape(-1).clone()
                whole[idx] = v.to(whole.device)
            weights[n] = whole.view(partitioned.shape(w))
        return weights, entries

    @contextlib.contextmanager
    def off(self):
        """The frozen teacher: the selected entries at their base values, for the block's duration."""
        self._put(self.base)
        try:
            yield
        finally:
            self.sync()

    def restore(self) -> None:
        """Put the base values back: the network is bit-identical to how it came."""
        self._put(self.base)
        for h in self._hooks:
            h.remove()
        for w in self.weights.values():
            w.requires_grad_(False)
            w.grad = None


def slice_run(weight: torch.Tensor, indices: torch.Tensor | None) -> tuple[int, int] | None:
    """The run [a, b) of the sorted `indices` that falls in this process's ZeRO-3 slice of `weight`
    (binary search: no per-entry mask), or None when ZeRO-3 does not partition it or indices is None."""
    part = getattr(weight, "ds_tensor", None)
    if part is None or indices is None:
        return None
    lo = part.ds_numel * torch.distributed.get_rank(group=weight.ds_process_group)
    bounds = torch.tensor([lo, lo + part.ds_numel], dtype=indices.dtype, device=indices.device)
    a, b = torch.searchsorted(indices, bounds).tolist()
    return a, b


@torch.no_grad()
def put_entries(weight: torch.Tensor, indices: torch.Tensor | None, values: torch.Tensor,
                run: tuple[int, int] | None = None) -> None:
    """values (any float dtype, rounded to weight's) into the flattened weight at indices (int, sorted;
    None: every entry). A weight that DeepSpeed ZeRO-3 partitions (training.engine) keeps its
    entries in this process's slice of the flat weight (ds_tensor), which every gather reads: each
    process writes the entries that fall in its slice (the run of the sorted indices slice_run finds;
    `run` when the caller has it already: no wait on the GPU), and the whole weight too while it is
    gathered (or kept whole, as ZeRO-3 keeps small parameters)."""
    flat = values.reshape(-1).to(weight.dtype)
    part = getattr(weight, "ds_tensor", None)
    if part is None or weight.numel() == getattr(weight, "ds_numel", -1):
        target = weight.data.view(-1)
        target.copy_(flat) if indices is None else target.index_put_((indices,), flat)
    if part is None:
        return
    size = part.ds_numel
    lo = size * torch.distributed.get_rank(group=weight.ds_process_group)
    if indices is None:
        n = max(0, min(size, flat.numel() - lo))
        part.view(-1)[:n].copy_(flat[lo:lo + n].to(part.device))
        return
    a, b = run or slice_run(weight, indices)
    part.view(-1).index_put_(((indices[a:b] - lo).to(part.device),), flat[a:b].to(part.device))


@torch.no_grad()
def lora_delta(network: torch.nn.Module, module: str, adapter: str = ADAPTER) -> torch.Tensor:
    """The weight change scale * B @ A that the adapter adds to `module` (out x in, fp32)."""
    layer = network.get_submodule(module)
    a, b = layer.lora_A[adapter].weight.float(), layer.lora_B[adapter].weight.float()
    return layer.scaling[adapter] * (b @ a)
