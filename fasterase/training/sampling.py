"""x_t at any noise level on the model's own sampling trajectory, and the clean latents a
prediction implies.

ESD's and ANT's losses are expectations over t drawn uniformly from an interval, so x_t is needed
at the drawn noise level, not only at the sampler's few grid steps. The sampler runs to the grid
step at or just above tau (noisier; the first step for a tau above it), and one deterministic
step along the same guided prediction moves x to tau: DDIM for SD, Euler for FLUX, the steps the
rollouts themselves take, so it costs one guided prediction and a tau on the grid gives the
grid's x.
"""
from __future__ import annotations

import torch

from ..models import Cond, Denoiser


def split(model: Denoiser, x: torch.Tensor, out: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean latents x0 and noise n that latents x at noise levels tau and the prediction `out`
    there imply: x = a x0 + b n and out = c x0 + d n (add_noise and target are linear in x0 and n),
    solved. Differentiable in x and out."""
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    a, b = model.add_noise(one, zero, tau), model.add_noise(zero, one, tau)
    c, d = model.target(one, zero, tau), model.target(zero, one, tau)
    det = a * d - b * c
    return (d * x - b * out) / det, (a * out - c * x) / det


def move(model: Denoiser, x: torch.Tensor, out: torch.Tensor, tau: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """The latents at noise levels `to` that a deterministic step from x (at noise levels tau) along
    the prediction `out` reaches: split into x0 and n, noised again at `to`."""
    x0, n = split(model, x, out, tau)
    return model.add_noise(x0, n, to)


@torch.no_grad()
def rollout_predictions(model: Denoiser, cond: Cond, steps: int, guidance: float,
                        x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One guided sampling run from the noise x, kept whole: (x (steps, N, ...) the latents entering
    each step, tau (steps,) its noise level, x0 (steps, N, ...) the clean latents its guided
    prediction implies). The predictions are the ones the sampler steps with, so x0 costs nothing."""
    sched, grid = model.sampler(steps), model.sampling_taus(steps)
    xs, taus, x0s = [], [], []
    for i, tau in enumerate(grid):
        t = torch.full((len(cond),), tau)
        out = model.guided(x, t, cond, guidance) if guidance != 1.0 else model.predict(x, t, cond)
        xs.append(x)
        taus.append(tau)
        x0s.append(split(model, x, out, t)[0])
        x = sched.step(out, sched.timesteps[i], x).prev_sample
    return torch.stack(xs), torch.tensor(taus), torch.stack(x0s)


@torch.no_grad()
def states(model: Denoiser, cond: Cond, steps: int, taus: list[float], guidance: float | None = None,
           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """The latents at each noise level of `taus` on one `steps`-step sampling run from the
    generator's noise (guided by `guidance`, the model's default if None)."""
    guidance = model.default_guidance if guidance is None else guidance
    grid = model.sampling_taus(steps)
    at = [max([i for i, s in enumerate(grid) if s >= tau], default=0) for tau in taus]
    xs = model.trajectory(cond, steps, at, guidance, generator)
    n = len(cond)
    x = torch.cat(xs)
    s = torch.cat([torch.full((n,), grid[i]) for i in at])
    to = torch.cat([torch.full((n,), float(tau)) for tau in taus])
    c = Cond.cat([cond] * len(taus))
    out = model.guided(x, s, c, guidance) if guidance != 1.0 else model.predict(x, s, c)
    return list(move(model, x, out, s, to).chunk(len(taus)))


def step_to(model: Denoiser, x: torch.Tensor, out: torch.Tensor, tau: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """The deterministic step of `move`, except that rows going to noise level 0 land on the clean
    latents themselves (SD's add_noise at tau 0 keeps its first timestep's sliver of noise).
    Differentiable in x and out; linear in both."""
    x0, n = split(model, x, out, tau)
    clean = (to == 0).to(x.device).view(-1, *[1] * (x.dim() - 1))
    return torch.where(clean, x0, model.add_noise(x0, n, to))


@torch.no_grad()
def switched_rollout(model: Denoiser, before: Cond, after: Cond, switch: int, steps: int, guidance: float,
                     x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One guided `steps`-step run from the noise x, conditioned on `before` for the steps before
    `switch` and on `after` from it on (TRACE's target trajectory: the concept prompt until t0, then
    its neutral pair). Returns (x (steps + 1, N, ...): the latents entering each step, then the clean
    end, and tau (steps + 1,): their noise levels, the last 0). Every step is step_to."""
    taus = model.sampling_taus(steps) + [0.0]
    xs = [x]
    for i in range(steps):
        cond = before if i < switch else after
        t, to = torch.full((len(x),), taus[i]), torch.full((len(x),), taus[i + 1])
        out = model.guided(x, t, cond, guidance) if guidance != 1.0 else model.predict(x, t, cond)
        x = step_to(model, x, out, t, to)
        xs.append(x)
    return torch.stack(xs), torch.tensor(taus)
