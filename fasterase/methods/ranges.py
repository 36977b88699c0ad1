"""The valid range of every method option, checked by the configs before any work.

A value outside them either cannot act (a negative seed, a rollout of zero steps) or cannot be
held by the float32 math it feeds: scales are squared in the losses and closed forms and summed
over rows and elements, so they stay at or below MAX_SCALE (1e12 squared, far inside float32's
3.4e38); 1e300 would overflow on its way into a tensor.
"""
from __future__ import annotations

import math

from ..errors import UserError
from ..models import partitioned
from ..training import engine

MAX_SCALE = 1e6
# A regulariser below this vanishes in float32 next to the Gram matrix's entries (~1e2 for text
# embeddings, float32 keeps 7 digits): the solve would be as ill posed as without it.
MIN_LAM = 1e-6
MAX_LR = 1.0  # Adam moves every weight by about lr a step: past 1 it is noise, not training
MAX_SEED = 2**32 - 1  # the seeds numpy and every framework accept alike
MAX_SAMPLE_STEPS = 1000  # SD's and FLUX's schedulers have 1000 training timesteps
# Classifier-free guidance of the rollouts that give x_t: 1 samples the plain conditional model;
# below 1 x_t leans toward the unconditional model's images, off the concept's trajectory that
# the methods train on; past 100 the rollout leaves the data range entirely.
GUIDANCE = (1.0, 100.0)
MAX_BATCH = 1024  # prompts per step: past this no GPU holds one step at SD's resolution


def _show(v) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def check(method: str, name: str, value, low: float, high: float = math.inf, *, above: bool = False,
          integer: bool = False) -> None:
    """Refuse `value` unless it is a number (an integer where `integer`), finite, at least `low`
    (more than `low` where `above`) and at most `high`."""
    kinds = int if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    ok = ok and (value > low if above else value >= low) and value <= high
    if not ok:
        bounds = (f"> {_show(low)}" if above else f">= {_show(low)}") + ("" if high == math.inf else
                                                                       f" and <= {_show(high)}")
        raise UserError(f"{method} option {name} must be {bounds} ({'an integer' if integer else 'a number'}), "
                        f"got {value!r}")


def check_switch(method: str, t0: float, steps: int, model, needs: str) -> None:
    """t0 must leave steps of the model's `steps`-step sampler grid on both sides (`needs` says why); checked
    with the method's idle options, before any work."""
    grid = model.sampling_taus(steps)
    if not any(t > t0 for t in grid) or not any(t <= t0 for t in grid):
        raise UserError(f"{method} option t0={t0:g} leaves no sampler step on one side: the {steps}-step grid's "
                        f"noise levels run from {grid[0]:.3g} to {grid[-1]:.3g}; {needs}")


def check_common(method: str, cfg) -> None:
    """The options every training method shares: seed, steps, batch, rollouts, checkpoint, engine."""
    check(method, "seed", cfg.seed, 0, MAX_SEED, integer=True)
    for k in ("steps", "rank"):
        if getattr(cfg, k, None) is not None:
            check(method, k, getattr(cfg, k), 1, integer=True)
    check(method, "batch_size", cfg.batch_size, 1, MAX_BATCH, integer=True)
    check(method, "sample_steps", cfg.sample_steps, 1, MAX_SAMPLE_STEPS, integer=True)
    check(method, "guidance", cfg.guidance, *GUIDANCE)
    if hasattr(cfg, "eta"):
        check(method, "eta", cfg.eta, 0, MAX_SCALE, above=True)
    if cfg.lr is not None:
        check(method, "lr", cfg.lr, 0, MAX_LR, above=True)
    check(method, "max_skipped_steps", cfg.max_skipped_steps, 0, integer=True)
    check(method, "checkpoint_every", cfg.checkpoint_every, 1, integer=True)
    if cfg.checkpoint is not None and (not isinstance(cfg.checkpoint, str) or not cfg.checkpoint.strip()):
        raise UserError(f"{method} option checkpoint must be a file path (or unset), got {cfg.checkpoint!r}")
    engine.check_options(method, cfg.zero, cfg.deepspeed_config)


def check_rank(method: str, rank: int, network, modules: list[str]) -> None:
    """A LoRA's rank cannot exceed the largest rank a weight it adapts can have (out x in, a
    convolution's in x kernel flattened): past it, every layer's factors only cost memory (rank
    100000 on toy-sd asked for 23 GB). Narrower layers take the rank as peft gives it (SD's conv_out
    has 4 channels), so a rank of 8 or 16 stays usable on a whole UNet."""
    shapes = {m: partitioned.shape(network.get_submodule(m).weight) for m in modules}
    sizes = {m: min(shape[0], math.prod(shape[1:])) for m, shape in shapes.items()}
    largest = max(sizes, key=sizes.get)
    if rank > sizes[largest]:
        raise UserError(f"{method} option rank={rank} exceeds the rank of every layer it would adapt: at most "
                        f"{sizes[largest]} ({largest}, {tuple(shapes[largest])})")
