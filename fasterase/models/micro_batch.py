"""A network call with a graph, run `step` rows at a time: gradient accumulation inside one pass.

Forward runs the chunks without a graph and keeps only their inputs and the output. Backward runs
each chunk again with a graph and back-propagates it on its own (a nested backward, as torch's
reentrant checkpoint does), before the next: one chunk's activations are alive at a time, and each
parameter's gradient arrives chunk by chunk and is accumulated where it lands (.grad, or the hook
CompactDelta gathers with), never held whole for every parameter at once. torch's non-reentrant
checkpoint would hold that whole-network gradient: one autograd task sums every chunk's contribution
to a parameter before accumulating it. Cost: one more forward pass.

Each chunk's random state (CPU, and the GPU's when the rows are there) is saved before its forward and
restored for its recompute, so dropout draws the same masks twice. Limits, none reached by the methods:
a weight changed in place between forward and backward is read changed by the recompute (autograd would
refuse); torch.autograd.grad() cannot ask for the parameters' gradients (they arrive only through the
nested backward); keyword tensors of `run` are not split by rows (only positional ones are).
"""
from __future__ import annotations

from typing import Callable

import torch


class _Chunks(torch.autograd.Function):
    """run over row chunks; see the module's docstring. `anchor`: an empty leaf that requires grad, so
    the output does even when no input does (the gradient goes to run's parameters)."""

    @staticmethod
    def forward(ctx, run: Callable, step: int, anchor: torch.Tensor, x: torch.Tensor, *tensors: torch.Tensor):
        ctx.run, ctx.step, ctx.states = run, step, []
        ctx.save_for_backward(x, *tensors)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), step):
                ctx.states.append(_rng_state(x.device))
                outs.append(run(x[i:i + step], *(t[i:i + step] for t in tensors)))
        return torch.cat(outs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        inputs = ctx.saved_tensors
        device = inputs[0].device
        grads = [torch.zeros_like(t) if t.requires_grad else None for t in inputs]
        for i, state in zip(range(0, len(grad), ctx.step), ctx.states):
            rows = [t[i:i + ctx.step].detach().requires_grad_(t.requires_grad) for t in inputs]
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.enable_grad():
                _set_rng_state(device, state)
                out = ctx.run(*rows)
            if out.requires_grad:
                torch.autograd.backward(out, grad[i:i + ctx.step])
            for whole, r in zip(grads, rows):
                if whole is not None and r.grad is not None:
                    whole[i:i + ctx.step] = r.grad
        return None, None, None, *grads


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def chunked(run: Callable[..., torch.Tensor], step: int, x: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
    """run(x, *tensors) over rows [i, i + step), concatenated; `tensors` are split along rows with x.
    Gradients reach run's parameters (and x / tensors that require grad) as the whole call's."""
    anchor = torch.empty(0, requires_grad=True)  # the output requires grad even when no input does
    return _Chunks.apply(run, step, anchor, x, *tensors)
