"""Sec. 3.1 of the ANT paper, measured in the toy world: sample a shape's evaluation prompts with
classifier-free guidance whose condition direction is reversed at and below t' (eq. 2), and count how
often the toy detector still sees the shape.

This is the sampling an exact fit of ANT's loss gives: the edited model predicts u* + eta d* above t'
and u* - eta d* below it (d* = c* - u*, the frozen model's condition direction), so guidance w
samples with u* + w eta d* and u* - w eta d*. The rate at a t' is what ANT can reach with that t' if
training fits its targets (with eta = 1, as here).

    python scripts/ant_reversal.py --model toy-sd --concept circle --t-split 0,1,0.92,0.86,0.8
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

from fasterase import models
from fasterase.toy import detector, shapes


@torch.no_grad()
def reversed_guidance_sample(model, prompts: list[str], t_split: float, guidance: float, steps: int,
                             seed: int) -> torch.Tensor:
    """Images in [0, 1]: guidance w above t', the condition direction reversed (-w) at and below it."""
    cond = model.encode(prompts)
    sched = model.sampler(steps)
    x = model.noise(len(prompts), torch.Generator().manual_seed(seed))
    for i, tau in enumerate(model.sampling_taus(steps)):
        w = guidance if tau > t_split else -guidance
        x = sched.step(model.guided(x, torch.full((len(prompts),), tau), cond, w), sched.timesteps[i], x).prev_sample
    return model.decode(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toy-sd", choices=["toy-sd", "toy-flux"])
    p.add_argument("--concept", default="circle", choices=shapes.SHAPES)
    p.add_argument("--t-split", default="0,1,0.92,0.86,0.8,0.7",
                   help="comma-separated noise levels t' in [0, 1]; 0 never reverses, 1 reverses every step")
    p.add_argument("--repeats", type=int, default=8, help="samples of each evaluation prompt")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20, help="sampler steps (the toy evaluation's)")
    p.add_argument("--guidance", type=float, default=3.0, help="w (the toy evaluation's)")
    args = p.parse_args()
    try:
        splits = [float(s) for s in args.t_split.split(",")]
    except ValueError:
        p.error(f"--t-split must be comma-separated numbers, got {args.t_split!r}")
    if any(not 0.0 <= s <= 1.0 for s in splits) or args.repeats < 1 or args.steps < 1:
        p.error("t' must lie in [0, 1], --repeats and --steps must be >= 1")
    model, det = models.load(args.model), detector.load()
    prompts = [shapes.caption(t, (args.concept, c)) for c in shapes.COLORS for t in shapes.TEMPLATES] * args.repeats
    print(f"| model | t' | {args.concept} rate ({len(prompts)} images, seed {args.seed}) | shapes drawn besides |")
    print("|---|---|---|---|")
    for s in splits:
        images = reversed_guidance_sample(model, prompts, s, args.guidance, args.steps, args.seed)
        seen = Counter(s for found in det.classify(images * 2 - 1) for s in (found or ["none"]))
        rate = seen.pop(args.concept, 0) / len(prompts)
        other = ", ".join(f"{k} {v}" for k, v in seen.most_common())
        print(f"| {args.model} | {s:g} | {rate:.3f} | {other or '-'} |", flush=True)


if __name__ == "__main__":
    main()
