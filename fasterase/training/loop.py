"""The one training loop: per-step seeds, progress bar, checkpoint/resume, non-finite guards.

Step k draws all its randomness from a generator seeded by (seed, k), so a run stopped and
resumed from its checkpoint ends with the same weights as one that never stopped. A checkpoint
records the run's identity (method, concepts, config, base-weights fingerprint, the model's image
size, noise schedule and text encoders), so it is only ever resumed by the same run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..errors import UserError
from ..files import check_writable, full_disk_named, set_default_mode
from . import engine as engines
from .loss_scale import LossScale

# Options that do not change what a run trains, so not part of its identity.
NOT_IDENTITY = ("checkpoint", "checkpoint_every", "max_skipped_steps", "deepspeed_config")
FORMAT = 2  # marks a checkpoint file as train()'s


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss."""


class NonFiniteGradients(FloatingPointError):
    """More optimizer steps than allowed were skipped for NaN or infinite gradients."""


class Companion(Protocol):
    """Training state beside the trained parameters and their optimizer (FADE's discriminator, its
    optimizer and rollout buffer): checkpointed and restored with them (tensors and containers
    only), shown on the progress bar, and able to end training early. state_dict() is taken after
    every step and must be a copy that later steps do not change."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def postfix(self) -> dict: ...

    def finished(self) -> bool: ...


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator seeded by (seed, *keys): independent streams for every step or draw."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


@contextlib.contextmanager
def before_training(what: str, checkpoint: str | os.PathLike | None = None):
    """An interrupt while a method prepares (`what`: D pretraining, a saliency map) says what the same call
    does next: the checkpoint holds training steps, so with none saved it starts the preparation again, and
    with the `checkpoint` of an earlier call (ANT prepares before it resumes) it resumes from that."""
    try:
        yield
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # one process of a launched run says it
            if checkpoint is not None and Path(checkpoint).expanduser().is_file():
                told = (f"before training resumes: checkpoint {checkpoint} is kept, and the same call resumes "
                        "from it")
            else:
                told = "before the first training step: nothing was saved; the same call starts again"
            tqdm.write(f"interrupted during {what}, {told}", file=sys.stderr)
        raise


def identity(method: str, concepts, config, base_fingerprint: str | None, setting: dict, preserve=None) -> dict:
    """What makes a run this run: a checkpoint of any other is refused. concepts: Concepts or
    their dicts; config: the method's config (its checkpoint path and skip limit left out);
    base_fingerprint: of the weights it trains (None: not known yet); setting: the model's
    (Denoiser.setting(): image size, noise schedule, text encoders); preserve: the preserved names,
    given by a method whose training prompts hold them (FADE, TRACE)."""
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    run = {"method": method, "concepts": [c if isinstance(c, dict) else c.to_dict() for c in concepts],
           "config": {k: v for k, v in config.items() if k not in NOT_IDENTITY},
           "base_fingerprint": base_fingerprint, "model": setting}
    return run if preserve is None else {**run, "preserve": list(preserve)}


class Difference(NamedTuple):
    field: str  # the dotted name
    text: str  # as told: the name with the saved and the current value, or a summary of a dict's
    count: int  # the values it stands for


def _differences(saved, current, name: str = "") -> list[Difference]:
    """What differs between two nested dicts: dotted names, with the saved and the current value; more than
    eight of one dict's plain values (another model's noise schedule) as their count and the first."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = sorted(set(saved) | set(current), key=str)
        found = [d for k in keys for d in _differences(saved.get(k), current.get(k), f"{name}.{k}" if name else str(k))]
        plain = not any(isinstance(d.get(k), dict) for d in (saved, current) for k in keys)
        if name and plain and len(found) > 8:
            return [Difference(name, f"{len(found)} entries of {name}, e.g. {found[0].text}", len(found))]
        return found
    short = [repr(v) if len(repr(v)) <= 40 else repr(v[:33] + "...") if isinstance(v, str) else repr(v)[:37] + "..."
             for v in (saved, current)]
    return [] if saved == current else [Difference(name, f"{name} ({short[0]} there, {short[1]} here)", 1)]


def check_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file, checked before any work: a file name whose folder exists, and if the file
    is there, a fasterase checkpoint (any other file is never read as one, nor overwritten); so are the
    files of the other processes of a launched run (rank_file; the launcher's WORLD_SIZE)."""
    if not str(path).strip():
        raise UserError("checkpoint is empty; name a file to checkpoint to (or leave the option unset)")
    ckpt = Path(path).expanduser().resolve()
    if ckpt.is_dir():
        raise UserError(f"checkpoint {ckpt} is a folder; name a file in it, e.g. {ckpt / 'run.ckpt'}")
    if not ckpt.parent.is_dir():
        raise UserError(f"checkpoint {ckpt}: its folder {ckpt.parent} does not exist (or is not a folder); "
                        "create it or name a file in an existing folder")
    check_writable(ckpt.parent, f"checkpoint {ckpt}")
    for rank in range(int(os.environ.get("WORLD_SIZE", "1"))):
        if rank_file(ckpt, rank).exists():
            read_checkpoint(rank_file(ckpt, rank))
    return ckpt


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by train(), loaded as plain tensors and containers (nothing is unpickled
    that could run code); any other file is refused by name and left alone. Its tensors are memory-mapped on
    the CPU (also those a GPU run saved; a resume copies each where it goes):
    the checks before any work (check_checkpoint, check_run) read a checkpoint of 12B-scale masters without
    loading them, and a resume reads each once, as it copies it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a torch file, or one holding more than tensors and containers
        state = None
    if not isinstance(state, dict) or state.get("fasterase_checkpoint") != FORMAT:
        raise UserError(f"checkpoint {path} exists and is not a fasterase training checkpoint; it is left as "
                        "it is: name a new file (or one an earlier run of this command wrote)")
    return state


def check_run(path: str | os.PathLike, run: dict) -> None:
    """Before any work: the checkpoint file is usable (check_checkpoint) and, if it is there, of this `run`
    (companion_in), so a run of another method, model or option is refused before a method prepares."""
    companion_in(check_checkpoint(path), run)


def companion_in(path: str | os.PathLike, run: dict) -> dict | None:
    """The companion state of the checkpoint at `path`, if there is one (check_checkpoint first), once
    its run is this `run` (identity(); a base fingerprint of None, not known yet, is left to train());
    a checkpoint of another run is a UserError naming what differs."""
    ckpt = Path(path).expanduser().resolve()
    if not ckpt.is_file():
        return None
    state = read_checkpoint(ckpt)
    saved = state.get("run") or {}
    run = _recorded(saved, run)
    differ = [d for k, v in run.items() if v is not None for d in _differences(saved.get(k), v, f"run.{k}")]
    _refuse_other(ckpt, differ)
    return state.get("companion")


def _recorded(saved: dict, run: dict) -> dict:
    """`run` without what the saved run does not record: a checkpoint of fasterase before 2026-12-03 has no
    model setting, and resumes with it unchecked."""
    return {k: v for k, v in run.items() if k != "model" or "model" in saved}


# what follows from another kind of model (its settings; the weights it trains and their shapes) and from
# another method (its config; the weights it trains and their shapes; whether preserved names are part of its run)
_FOLLOWS = {"run.model.kind": ("run.model", "run.base_fingerprint", "parameters"),
            "run.method": ("run.config", "run.preserve", "run.base_fingerprint", "parameters")}


def _refuse_other(ckpt: Path, differ: list[Difference]) -> None:
    """UserError naming what differs: another kind of model or another method, with what follows from it
    counted, not listed; the rest (other concepts) named, the settings first and the fingerprints (hashes)
    last."""
    lead = [d for d in differ if d.field in _FOLLOWS]
    follows = [f for d in lead for f in _FOLLOWS[d.field]]
    folded = [d for d in differ if d not in lead and any(d.field == f or d.field.startswith(f + ".") for f in follows)]
    rest = sorted((d for d in differ if d not in lead and d not in folded),
                  key=lambda d: d.field in ("run.base_fingerprint", "run.model.text"))
    told = [d.text for d in lead]
    if folded:
        count = sum(d.count for d in folded)
        told.append(f"{count} more that follow{'s' if count == 1 else ''} from {'it' if len(lead) == 1 else 'them'}")
    told += [d.text for d in rest]
    if told:
        raise UserError(f"checkpoint {ckpt} belongs to another run: its {'; '.join(told)} "
                        f"differ{'s' if len(told) == 1 else ''} from this run's; use another checkpoint file, or "
                        "delete this one to start afresh")


def train(loss_fn: Callable[[int, torch.Generator], torch.Tensor], params: list[torch.nn.Parameter],
          optimizer: torch.optim.Optimizer, steps: int, seed: int, checkpoint: str | os.PathLike | None = None,
          checkpoint_every: int = 50, progress: bool = True, desc: str = "erase", run: dict | None = None,
          max_skipped_steps: int = 0, companion: Companion | None = None, zero: int = 0,
          deepspeed_config: str | None = None, after_step: Callable[[], None] | None = None,
          model=None) -> dict:
    """Run `steps` optimizer steps of loss_fn(step, generator); returns {'steps' (taken), 'last_loss',
    'skipped_steps', 'train_time_s' (wall seconds of the steps taken in this call), 'engine' (how
    it was stepped: training.engine's describe()), 'memory_options' (with `model`: the steps each
    micro_batch and gradient checkpointing setting ran, a list of {'from_step', 'micro_batch',
    'gradient_checkpointing'}: a run resumed with other memory options has one entry per setting)}. A `companion`
    is checkpointed with the parameters, adds to the progress bar,
    and ends training before `steps` when its finished() says so (checked after every step).
    The optimizer steps plainly, or under DeepSpeed ZeRO stage `zero` (2 or 3, `deepspeed_config`
    a JSON file of further DeepSpeed settings; training.engine; ZeRO-3 partitions the network of
    `model`, the Denoiser the params train in, for the run's duration; with several processes each
    computes its share of every network call's rows, models/shared_rows.py). `after_step()` runs after every
    step taken and after a resume (CompactDelta.sync: the network computes with the new values).

    A step whose gradients are not all finite is skipped (nothing changes, whatever the optimizer)
    and counted; past `max_skipped_steps` skipped steps training stops (NonFiniteGradients), as it
    does on a non-finite loss (NonFiniteLoss). With `model` in fp16 the loss is scaled before backward
    and the gradients divided back (training.loss_scale): a step that overflows the scale halves it and
    is skipped without counting; the scale is checkpointed, and reported as 'loss_scale'.

    With `checkpoint`, the trainable values, optimizer state and `run` (the run's identity, see
    identity()) are saved there every `checkpoint_every` steps, when interrupted (KeyboardInterrupt)
    and, marked finished, at the end. A run finding one resumes from it if it is the same run (else
    UserError naming what differs); a finished one gives its values and result without training
    (its optimizer state is not read).
    Under DeepSpeed with several processes each also writes its partition of the optimizer to a file
    of its own beside it (rank_file), and resumes only with as many processes; an interrupt there
    saves nothing (the processes stop at different points, and saving takes all of them): the last
    periodic checkpoint stands, and rank 0 says which.
    A path check_checkpoint refuses (a folder, a missing folder, a file that is not a checkpoint)
    is a UserError before the first step.
    """
    if max_skipped_steps < 0:
        raise UserError(f"max_skipped_steps must be >= 0, got {max_skipped_steps}")
    ckpt = check_checkpoint(checkpoint) if checkpoint is not None else None
    this = {"run": run, "seed": seed, "steps": steps, "parameters": [tuple(p.shape) for p in params]}
    state = _resumable(ckpt, this) if ckpt else None  # another run's is refused before DeepSpeed starts
    stepper = engines.make(params, optimizer, zero, deepspeed_config, model.network if model is not None else None)
    try:
        shared = model.sharing_rows() if model is not None and stepper.world_size > 1 else contextlib.nullcontext()
        with shared:
            return _train(loss_fn, params, stepper, steps, seed, ckpt, state, this, checkpoint_every, progress, desc,
                          max_skipped_steps, companion, after_step or (lambda: None), _memory_options(model),
                          LossScale(model is not None and model.network.dtype == torch.float16))
    finally:
        stepper.close()


def _resumable(ckpt: Path, this: dict) -> dict | None:
    """The checkpoint's state when the file exists and belongs to this run; UserError naming what differs."""
    if not ckpt.exists():
        return None
    state = read_checkpoint(ckpt)
    if isinstance(state.get("run"), dict) and isinstance(this["run"], dict):
        this = {**this, "run": _recorded(state["run"], this["run"])}
    differ = _differences({k: state.get(k) for k in this}, this)
    named = {d.field for d in differ}  # seed, steps: once, as the run's config field (or within its summary)
    differ = [d for d in differ
              if d.field not in ("seed", "steps") or not {f"run.config.{d.field}", "run.config"} & named]
    _refuse_other(ckpt, differ)
    return state


def rank_file(ckpt: Path, rank: int) -> Path:
    """The checkpoint file of process `rank` of a run under DeepSpeed: rank 0's is the run's own, which
    also holds the values, the companion and the step; each other process's holds its optimizer partition."""
    return ckpt if rank == 0 else ckpt.with_name(f"{ckpt.name}.rank{rank}")


def _write(path: Path, state: dict) -> None:
    """torch.save to a temporary file beside `path`, renamed over it: never half-written."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        with full_disk_named(path.parent, f"checkpoint {path}"):
            torch.save(state, tmp)
        set_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _own_optimizer(ckpt: Path, state: dict, rank: int, world_size: int) -> dict:
    """This process's optimizer state: rank 0's in the run's file, the others' in their own, which must be
    of the same step; the run must have as many processes as wrote them."""
    written = state["optimizer"].get("engine", {}).get("world_size", 1)
    if written != world_size:
        raise UserError(f"checkpoint {ckpt} was written by {written} process{'es' if written > 1 else ''} and this "
                        f"run has {world_size}: ZeRO partitions differ; resume with the same number")
    if rank == 0:
        return state["optimizer"]
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt}: the file of process {rank}, {path}, is missing; resume with the "
                        "files the run wrote, or delete them to start afresh")
    own = read_checkpoint(path)
    if own.get("step") != state["step"]:
        raise UserError(f"checkpoint files {ckpt} (step {state['step']}) and {path} (step {own.get('step')}) differ: "
                        "the run stopped while writing them; delete them to start afresh")
    return own["optimizer"]


def _memory_options(model) -> dict:
    """What the run's memory options are for the steps this call takes (not part of its identity: a run
    may resume with others)."""
    if model is None:
        return {}
    return {"micro_batch": model.micro_batch, "gradient_checkpointing": bool(model.network.is_gradient_checkpointing)}


def _train(loss_fn, params, stepper, steps, seed, ckpt, state, this, checkpoint_every, progress, desc,
           max_skipped_steps, companion, after_step, options, scale) -> dict:
    start, skipped, loss_value, history = 0, 0, float("nan"), []
    if state is not None:
        own = None if state["finished"] else _own_optimizer(ckpt, state, stepper.rank, stepper.world_size)
        stepper.set_values(state["params"])
        if own is not None:  # a finished run only gives its values: any number of processes may read them
            stepper.load_state_dict(own)
        after_step()
        if companion is not None:
            companion.load_state_dict(state["companion"])
        start, skipped, loss_value = state["step"], state["skipped_steps"], state["last_loss"]
        if "loss_scale" in state:
            scale.load_state_dict(state["loss_scale"])
        history = state.get("memory_options", [])
        if state["finished"]:
            return {"steps": start, "last_loss": loss_value, "skipped_steps": skipped, "train_time_s": 0.0,
                    "engine": stepper.describe(), "memory_options": history,
                    **({"loss_scale": scale.value} if scale.enabled else {})}
    if options and (not history or {k: v for k, v in history[-1].items() if k != "from_step"} != options):
        history = [*history, {"from_step": start, **options}]

    # the companion as it was at the end of the last finished step: an interrupt lands inside a step, after
    # the companion may have moved (FADE: a buffer refresh, D steps) but before the parameters did
    snapshot = companion.state_dict() if companion is not None else None

    def save(step: int, finished: bool = False) -> None:
        if not ckpt:
            return
        values, optimizer = stepper.values(), stepper.state_dict()  # every process takes part (ZeRO-3 gathers)
        if stepper.rank:
            _write(rank_file(ckpt, stepper.rank), {"fasterase_checkpoint": FORMAT, "step": step,
                                                   "optimizer": optimizer})
        if stepper.world_size > 1:  # every other file is written before the run's own names their step
            torch.distributed.barrier()
        if stepper.rank == 0:
            _write(ckpt, {"fasterase_checkpoint": FORMAT, **this, "params": values, "optimizer": optimizer,
                          "step": step, "skipped_steps": skipped, "last_loss": loss_value, "finished": finished,
                          "companion": snapshot, "memory_options": history, "loss_scale": scale.state_dict()})
        if stepper.world_size > 1:
            torch.distributed.barrier()

    done, began = start, time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not progress, leave=False)
    try:
        for step in bar:
            loss = loss_fn(step, step_generator(seed, step))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}; stopping. "
                                    "Lower the learning rate or check the inputs.")
            stepper.zero_grad()
            (loss * scale.value).backward()
            scale.unscale(params)
            if stepper.step():
                after_step()
                scale.stepped()
            elif not scale.overflowed():
                skipped += 1
                if skipped > max_skipped_steps:
                    raise NonFiniteGradients(
                        f"non-finite gradients at step {step}: {skipped} of {step + 1} steps skipped, more than "
                        f"max_skipped_steps={max_skipped_steps}; stopping. Lower the learning rate or check the "
                        "inputs.")
            done = step + 1
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.4g}", skipped=skipped, **(companion.postfix() if companion else {}))
            if companion is not None:
                snapshot = companion.state_dict()
                if companion.finished():
                    break
            if done % checkpoint_every == 0 and done < steps:
                save(done)
    except KeyboardInterrupt:
        if stepper.world_size == 1:
            save(done)
            if ckpt:
                tqdm.write(f"interrupted after step {done} of {steps}: saved to {ckpt}; the same call again resumes "
                           "from it", file=sys.stderr)
            else:
                tqdm.write(f"interrupted after step {done} of {steps}; nothing was saved: with a checkpoint file "
                           "(--set checkpoint=FILE, checkpoint= in the API) the same call resumes", file=sys.stderr)
        elif ckpt and stepper.rank == 0:
            last = max(start, done // checkpoint_every * checkpoint_every)  # the periodic saves' last
            kept = f"{ckpt} holds step {last}" if last else "no checkpoint was written yet"
            tqdm.write(f"interrupted in step {done + 1}: with {stepper.world_size} processes an interrupt saves "
                       f"nothing; {kept} (checkpoint_every={checkpoint_every})", file=sys.stderr)
        raise
    finally:
        bar.close()
    save(done, finished=True)
    return {"steps": done, "last_loss": loss_value, "skipped_steps": skipped,
            "train_time_s": time.perf_counter() - began, "engine": stepper.describe(), "memory_options": history,
            **({"loss_scale": scale.value} if scale.enabled else {})}
