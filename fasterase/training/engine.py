"""What steps the trainable parameters: plain PyTorch, or DeepSpeed ZeRO stage 2 or 3.

Every training method builds its trainables (LoRA factors, CompactDelta masters) and a client
optimizer (SalientAdamW under ZeRO, 8-bit states by default), and the training loop asks an engine
to step them once the method's backward has filled their gradients.

How a gradient reaches DeepSpeed. ZeRO-2 and ZeRO-3 reduce a gradient in a hook the moment autograd
accumulates it, and refuse a second arrival in one step; but our backward delivers gradients its own
way: a micro-batched pass back-propagates chunk by chunk (one arrival per chunk), and CompactDelta
gathers its masters' gradients in a hook on the base weights (autograd never accumulates them).
So DeepSpeed gets parameters of its own, one "shadow" per trainable, and, after the method's
backward, one backward of the surrogate loss sum_i <shadow_i, grad_i>, whose gradient with respect
to shadow_i is grad_i exactly: every gradient arrives once, finished. ZeRO-2 keeps full values on
every process, so each trainable then computes with its shadow's storage (no second copy); ZeRO-3
partitions the shadows, so after each step the trainables are refreshed from them.

What ZeRO splits between processes: the optimizer's side (its states, DeepSpeed's fp32 copy and
gradient partitions) under both stages, and under ZeRO-3 the frozen network too, for the method's
whole run (partitioned(), entered by api.erase): each process keeps one slice of every weight, and
DeepSpeed gathers a layer's weights whole just before the layer runs (forward, and again for
backward) and frees them after. Encoding, saliency maps, rollouts and the training loop all run on
the partitioned network; code that reads or writes a weight between passes goes through
models/partitioned.py (CompactDelta's selected entries are written into the slices:
training.params.put_entries), and LoRA factors added during the run stay whole beside the slices.
At the end the network is gathered whole, back where it came from, and DeepSpeed's hooks and
attributes are taken off: the network is as it came, with what the run wrote into it.

Several processes also share the work: each runs the network on its share of every call's rows
and receives the others' outputs (models/shared_rows.py, switched on by the training loop), so its
gradients are its rows' part of the batch's; every process holds the whole trainable values and
these gradients (the method's backward makes them before the engine hands them over). Each process
checkpoints its own partition of the optimizer (training.loop: one file a process).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
from pathlib import Path

import torch

from ..errors import UserError
from ..optim import SalientAdamW
from ..models.partitioned import COORDINATORS, is_partitioned, numel, release_leftovers, shape
from .params import put_entries

STAGES = (0, 2, 3)  # 0: plain PyTorch
# DeepSpeed's gradient bucket, in entries: its default, 5e8, is 2 GB in fp32; our gradients are all ready
# at once, so a smaller bucket costs only more, smaller reductions
BUCKET = 50_000_000


def grads_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every gradient is finite, on every device (one reduction per device)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            flags.setdefault(p.grad.device, []).append(torch.isfinite(p.grad).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def adamw(params: list[torch.nn.Parameter], lr: float, zero: int) -> torch.optim.Optimizer:
    """The optimizer of a method's LoRA factors: torch's AdamW in plain runs, SalientAdamW with 8-bit
    states as DeepSpeed's client optimizer (no weight decay either way)."""
    if zero:
        return SalientAdamW(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def check_options(method: str, zero, deepspeed_config) -> None:
    """The engine options every training method shares, checked before any work."""
    if zero not in STAGES or isinstance(zero, bool):
        raise UserError(f"{method} option zero must be 0 (plain PyTorch), 2 or 3 (DeepSpeed ZeRO stage), got {zero!r}")
    if deepspeed_config is not None:
        if not zero:
            raise UserError(f"{method} option deepspeed_config needs zero=2 or zero=3")
        read_config(deepspeed_config)


def read_config(path: str) -> dict:
    """A DeepSpeed config file (JSON), with the keys the engine sets itself refused by name."""
    file = Path(path).expanduser()
    try:
        config = json.loads(file.read_text())
    except OSError as e:
        raise UserError(f"deepspeed_config {file}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"deepspeed_config {file} is not JSON: {e}") from None
    if not isinstance(config, dict):
        raise UserError(f"deepspeed_config {file} must hold a JSON object, got {type(config).__name__}")
    if not isinstance(config.get("zero_optimization", {}), dict):
        raise UserError(f"deepspeed_config {file}: zero_optimization must be a JSON object, got "
                        f"{type(config['zero_optimization']).__name__}")
    ours = {"optimizer": "the client optimizer is SalientAdamW", "zero_optimization.stage": "set with zero=2|3",
            "fp16": "trainables are fp32", "bf16": "trainables are fp32", "scheduler": "methods keep lr fixed",
            "gradient_accumulation_steps": "one batch per step", "train_batch_size": "set by the method's batch_size"}
    stage = "stage" in config.get("zero_optimization", {})
    taken = [k for k in ours if (k in config if "." not in k else stage)]
    if taken:
        raise UserError(f"deepspeed_config {file} sets {', '.join(taken)}, which fasterase sets itself ("
                        + "; ".join(f"{k}: {ours[k]}" for k in taken) + "); leave them out")
    return config


class Plain:
    """One optimizer step after the method's backward, skipped when a gradient is not finite."""

    world_size, rank = 1, 0

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer):
        self.params, self.optimizer = params, optimizer

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> bool:
        """Step if every gradient is finite; whether it stepped."""
        if not grads_finite(self.params):
            return False
        self.optimizer.step()
        return True

    def values(self) -> list[torch.Tensor]:
        """The trainables' whole values (copies), for a checkpoint."""
        return [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def set_values(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.params, values):
            p.copy_(v)

    def state_dict(self) -> dict:
        return {"engine": self.describe(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])

    def describe(self) -> dict:
        return {"engine": "plain", "world_size": 1, **optimizer_report(self.optimizer, self.params)}

    def close(self) -> None:
        pass


def optimizer_report(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """The optimizer, the dtype of its states and of the trainables, for an edit's report."""
    states = optimizer.state_dtype if isinstance(optimizer, SalientAdamW) else "fp32"
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    return {"optimizer": type(optimizer).__name__, "optimizer_states": states, "trainable_dtype": ",".join(dtypes)}


def _free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_deepspeed(device: torch.device):
    """deepspeed, imported on the accelerator of `device`, with its process group up: started by
    the `deepspeed` launcher (its environment), or else as a single process."""
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("zero=2|3 needs DeepSpeed: pip install 'fasterase[scale]'")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else device.type)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if accelerator != device.type:
        raise UserError(f"DeepSpeed runs on its {accelerator!r} accelerator but the trainables are on {device}; "
                        f"set DS_ACCELERATOR={device.type} (or train on the accelerator's device)")
    if not torch.distributed.is_initialized():
        for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1"}.items():
            os.environ.setdefault(k, v)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    # DeepSpeed's communication backend, over the process group (started here unless it is)
    deepspeed.init_distributed(dist_backend="gloo" if device.type == "cpu" else "nccl", verbose=False)
    if accelerator == "cpu":
        _unlink_shared_memory()
    return deepspeed


def _unlink_shared_memory() -> None:
    """DeepSpeed's CPU accelerator gives each process of a one-machine run a shared-memory buffer for its
    all-reduce (/dev/shm/deepspeed_allreduce_buffer_*, 67 MB) and never unlinks it: every run on the CPU
    would leave its buffers behind in memory until the machine restarts. Once every process has
    mapped every other's (DeepSpeed's start waits for that; the barrier waits for every start), the
    names go; the mappings stay until the processes end."""
    torch.distributed.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{torch.distributed.get_rank()}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def _config(config_file: str | None, stage: int, entries: int) -> dict:
    """The DeepSpeed config of a run: the user's file with what fasterase sets itself, for `entries`
    trainable entries."""
    # DeepSpeed clips gradients to norm 1.0 unless told otherwise; the plain engine does not clip
    config = {"gradient_clipping": 0.0, **(read_config(config_file) if config_file else {}),
              "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False,
              "steps_per_print": 2**62, "wall_clock_breakdown": False}
    # ZeRO-3 otherwise replaces torch.nn.functional.linear for good (its "memory efficient linear", for
    # partitioned layers, which the surrogate has none of): the network's layers would run through it
    config["zero_optimization"] = {"reduce_bucket_size": max(1, min(BUCKET, entries)),
                                   "memory_efficient_linear": False,
                                   **config.get("zero_optimization", {}), "stage": stage}
    return config


class _Surrogate(torch.nn.Module):
    """DeepSpeed's model: the shadows, and forward(grads) = sum_i <shadow_i, grad_i>."""

    def __init__(self, shadows: list[torch.nn.Parameter]):
        super().__init__()
        for i, s in enumerate(shadows):
            self.register_parameter(f"p{i}", s)

    def forward(self, grads: list[torch.Tensor]) -> torch.Tensor:
        return sum((getattr(self, f"p{i}") * g).sum() for i, g in enumerate(grads))


class Zero:
    """DeepSpeed ZeRO stage 2 or 3 over the trainables, with `optimizer` (SalientAdamW) as its client
    optimizer. `network`, the module the trainables act in: when partitioned() holds it, the report
    says how much of it a process holds, and each step first frees the layers the backward left
    gathered. Raises UserError without DeepSpeed, for another optimizer, or when DeepSpeed would not
    step with it."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, stage: int,
                 config_file: str | None = None, network: torch.nn.Module | None = None):
        if not isinstance(optimizer, SalientAdamW):
            raise UserError(f"ZeRO steps with SalientAdamW as its client optimizer, got {type(optimizer).__name__}")
        if optimizer.masks:
            raise UserError("under ZeRO the trainables are flattened together: train compact deltas, not masks")
        self.params, self.stage = params, stage
        ds = _start_deepspeed(params[0].device)
        self.deepspeed = ds
        self.world_size, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        with torch.no_grad():
            self.shadows = [torch.nn.Parameter(p.detach().clone()) for p in params]
        # the client optimizer steps the shadows (DeepSpeed puts its flat partitions in their place)
        optimizer.param_groups[0]["params"] = list(self.shadows)
        optimizer.state.clear()
        config = _config(config_file, stage, sum(p.numel() for p in params))
        self.engine, _, _, _ = ds.initialize(model=_Surrogate(self.shadows), optimizer=optimizer, config=config)
        if self.engine.basic_optimizer is not optimizer:  # DeepSpeed may swap a client optimizer (ZeRO-Offload)
            raise UserError(f"DeepSpeed replaced SalientAdamW by {type(self.engine.basic_optimizer).__name__}; "
                            "remove what asks for it from deepspeed_config")
        if stage == 2:  # full values on every process: the trainables compute with the shadows' storage
            for p, s in zip(params, self.shadows):
                p.data = s.data
        self.network = network if network is not None and any(map(is_partitioned, network.parameters())) else None
        self.network_held = _held(network) if self.network is not None else None

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> bool:
        """Hand the finished gradients to DeepSpeed and step, if every gradient of every process is
        finite. Each process's gradients are its rows' part of the batch's (models/shared_rows.py):
        DeepSpeed averages them, so they go in multiplied by the number of processes."""
        if self.network is not None:
            release_leftovers(self.network)
        finite = torch.tensor(float(grads_finite(self.params)), device=self.params[0].device)
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite:
            return False
        grads = [p.grad * self.world_size if p.grad is not None
                 else torch.zeros(shape(p), dtype=p.dtype, device=p.device) for p in self.params]
        self.zero_grad()
        self.engine.backward(self.engine(grads))
        self.engine.step()
        self._pull()
        return True

    @torch.no_grad()
    def _pull(self) -> None:
        """ZeRO-3: the trainables take the shadows' new values (gathered), into their slices where the
        network is partitioned."""
        if self.stage == 3:
            with self.deepspeed.zero.GatheredParameters(self.shadows):
                for p, s in zip(self.params, self.shadows):
                    put_entries(p, None, s)

    def values(self) -> list[torch.Tensor]:
        """The trainables' whole values (copies), for a checkpoint: ZeRO-3 gathers them from the shadows."""
        if self.stage == 2:
            return [p.detach().clone() for p in self.params]
        with self.deepspeed.zero.GatheredParameters(self.shadows):
            return [s.detach().clone() for s in self.shadows]

    @torch.no_grad()
    def set_values(self, values: list[torch.Tensor]) -> None:
        """The trainables' values (a checkpoint's), on every process, before load_state_dict."""
        if self.stage == 2:  # the trainables are the shadows' storage
            for p, v in zip(self.params, values):
                p.copy_(v)
            return
        with self.deepspeed.zero.GatheredParameters(self.shadows, modifier_rank=0):
            for s, v in zip(self.shadows, values):
                s.copy_(v)
        self._pull()

    def state_dict(self) -> dict:
        """This process's state: its partition of the optimizer (the training loop writes one file a process)."""
        return {"engine": self.describe(), "optimizer": _plain_entries(self.engine.optimizer.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        """The DeepSpeed optimizer's state, fp32 copies and 8-bit states included; the trainables'
        values must be set first (set_values), and the state be of as many processes (training.loop checks)."""
        full = {**self.engine.optimizer.state_dict(), **state["optimizer"]}
        # DeepSpeed reads the entry of this process's rank in a list of every process's states (here, its own)
        self.engine.optimizer.load_state_dict([full] * self.world_size, load_optimizer_states=True,
                                              load_from_fp32_weights=True)
        self._pull()

    def describe(self) -> dict:
        return {"engine": f"deepspeed-zero{self.stage}", "world_size": self.world_size,
                **({"network_held": self.network_held} if self.network_held is not None else {}),
                **optimizer_report(self.engine.basic_optimizer, self.params)}

    def close(self) -> None:
        """The trainables keep their values in storage of their own (ZeRO-2 shared DeepSpeed's)."""
        if self.stage == 2:
            for p in self.params:
                p.data = p.data.clone()
        self.engine.destroy()


@contextlib.contextmanager
def partitioned(network: torch.nn.Module, device: torch.device, config_file: str | None = None):
    """ZeRO-3 over the frozen `network` for the block (a method's whole run under zero=3): each
    process keeps one slice of every weight on `device`, DeepSpeed gathers a layer's weights for its
    passes and frees them after (models/partitioned.py reads and writes them between passes). The
    network is never whole on `device`: each weight is moved there and sliced in turn. At the end the
    weights are gathered whole, one at a time, back where they came from, and DeepSpeed's hooks and
    attributes are taken off: the network is as it came, with what the block wrote into it."""
    _start_deepspeed(device)
    home = next(network.parameters()).device
    own = _attributes(network)
    _move_buffers(network, device)
    coordinator = _partition(network, _config(config_file, 3, 1))
    COORDINATORS[network] = coordinator
    try:
        yield
    finally:
        del COORDINATORS[network]
        with torch.no_grad():
            for p in network.parameters():  # in the same order on every process: collective
                if p.numel() != numel(p):
                    p.all_gather()
                p.data = p.data.to(home)
        coordinator.destroy()
        _strip(network, own)
        _move_buffers(network, home)


def _move_buffers(network: torch.nn.Module, device: torch.device) -> None:
    """The network's buffers to `device` (ZeRO-3 partitions parameters only)."""
    for module in network.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = buffer.to(device)


def _partition(network: torch.nn.Module, config: dict):
    """`network` partitioned by DeepSpeed's ZeRO-3 parameter coordinator (what a ZeRO-3 engine uses for
    its model, here without an engine: nothing of the network trains through DeepSpeed, and an engine
    would add hooks of its own to every call), with the zero_optimization settings of `config`."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload
    from deepspeed.utils.timer import NoopTimer

    zero = DeepSpeedConfig(config).zero_config
    return DeepSpeedZeRoOffload(network, timers=NoopTimer(), ds_config=config, overlap_comm=zero.overlap_comm,
                                prefetch_bucket_size=zero.prefetch_bucket_size,
                                max_reuse_distance=zero.max_reuse_distance,
                                max_live_parameters=zero.max_live_parameters,
                                param_persistence_threshold=zero.param_persistence_threshold,
                                model_persistence_threshold=zero.model_persistence_threshold,
                                offload_param_config=zero.offload_param)


def _held(network: torch.nn.Module) -> float:
    """The share of a ZeRO-3 partitioned network's bytes this process holds between layers: its slices, the
    small parameters ZeRO-3 keeps whole beside theirs (stage3_param_persistence_threshold), and those added
    since it partitioned the network (LoRA factors)."""
    whole = held = 0
    for p in network.parameters():
        whole += numel(p) * p.element_size()
        if not is_partitioned(p):
            held += p.numel() * p.element_size()
        else:
            held += (p.ds_tensor.numel() + (p.ds_numel if p.ds_persist else 0)) * p.element_size()
    return round(held / whole, 4)


def _attributes(network: torch.nn.Module) -> dict[int, set[str]]:
    """The attribute names of every module and parameter of `network`, before DeepSpeed adds its own."""
    return {id(o): set(vars(o)) for o in (*network.modules(), *network.parameters())}


def _strip(network: torch.nn.Module, own: dict[int, set[str]]) -> None:
    """Take off what ZeRO-3 added to the network's modules and parameters (partitions, hooks' state,
    its parameter dict): each is the plain module or parameter it was."""
    for o in (*network.modules(), *network.parameters()):
        for name in set(vars(o)) - own[id(o)]:
            delattr(o, name)
        if isinstance(o, torch.nn.Module):
            o._parameters = dict(o._parameters)


def _plain(value) -> bool:
    """Whether torch.load(weights_only=True) reads `value` back: tensors, numbers, text, None, and
    lists, tuples and dicts of them."""
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return value is None or type(value) in (torch.Tensor, torch.nn.Parameter, int, float, bool, str)


def _plain_entries(state: dict) -> dict:
    """The entries of a DeepSpeed optimizer's state that torch.load(weights_only=True) reads back
    (tensors, containers, numbers, text: the client optimizer's state, the fp32 partitions, the
    paddings). The others are DeepSpeed's own objects (its loss scaler, parameter maps, stage enum),
    which a checkpoint must not unpickle; a resuming engine rebuilds the same ones itself."""
    return {k: v for k, v in state.items() if _plain(v)}


def make(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer, zero: int = 0,
         deepspeed_config: str | None = None, network: torch.nn.Module | None = None) -> Plain | Zero:
    """The engine for `zero` (0: plain PyTorch; 2, 3: DeepSpeed ZeRO stage, 3 partitioning `network`)."""
    return Zero(params, optimizer, zero, deepspeed_config, network) if zero else Plain(params, optimizer)
