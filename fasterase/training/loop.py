"""The one training loop: per-step seeds, progress bar, checkpoint/resume, non-finite guard.

Step k draws all its randomness from a generator seeded by (seed, k), so a run stopped and
resumed from its checkpoint ends with the same weights as one that never stopped.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss."""


def step_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator seeded by (seed, *keys): independent streams for every step or draw."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *keys]).generate_state(1)[0]))


def train(loss_fn: Callable[[int, torch.Generator], torch.Tensor], params: list[torch.nn.Parameter],
          optimizer: torch.optim.Optimizer, steps: int, seed: int, checkpoint: str | os.PathLike | None = None,
          checkpoint_every: int = 50, progress: bool = True, desc: str = "erase") -> dict:
    """Run `steps` optimizer steps of loss_fn(step, generator); returns {'steps', 'last_loss'}.

    With `checkpoint`, the trainable values and optimizer state are saved there every
    `checkpoint_every` steps and when interrupted (KeyboardInterrupt), and a run finding one
    resumes from it.
    """
    start = 0
    ckpt = Path(checkpoint) if checkpoint else None
    if ckpt and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if len(state["params"]) != len(params) or state["seed"] != seed:
            raise ValueError(f"checkpoint {ckpt} belongs to another run (different parameters or seed)")
        with torch.no_grad():
            for p, v in zip(params, state["params"]):
                p.copy_(v)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]

    def save(step: int) -> None:
        if ckpt:
            tmp = ckpt.with_name(ckpt.name + ".tmp")
            torch.save({"params": [p.detach().clone() for p in params], "optimizer": optimizer.state_dict(),
                        "step": step, "seed": seed}, tmp)
            os.replace(tmp, ckpt)

    loss_value = float("nan")
    done = start
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=desc, disable=not progress, leave=False)
    try:
        for step in bar:
            loss = loss_fn(step, step_generator(seed, step))
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}; stopping. "
                                    "Lower the learning rate or check the inputs.")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = step + 1
            loss_value = loss.item()
            bar.set_postfix(loss=f"{loss_value:.4g}")
            if done % checkpoint_every == 0:
                save(done)
    except KeyboardInterrupt:
        save(done)
        raise
    finally:
        bar.close()
    return {"steps": steps, "last_loss": loss_value}
