"""Dynamic loss scaling for a network that computes in fp16.

A diffusion loss is a mean over every latent entry, so its gradient at the network's output is about
2 (prediction - target) / (batch x latent entries): near 1e-5 at 512 px, where fp16 holds at most 7
significant bits and smaller values flush to zero. Measured on the toy UNet at 256 x 384 px (fp16
base, fp32 LoRA factors): the LoRA gradients were 71% off the fp32 base's (relative L2 error) and 3%
of them zero; with the loss scaled by 2^10 and the fp32 gradients divided back, 0.04% off
(bench/RESULTS.md, "fp16 gradients"). bf16 has fp32's exponent range and needs no scale.

The rule is torch.amp.GradScaler's (Micikevicius et al., "Mixed Precision Training", ICLR 2018): start
at 2^16, halve and skip the step when a gradient overflows, double after 2000 steps without one. It
is ours and not GradScaler itself because under DeepSpeed ZeRO the optimizer does not hold the
trainables whose gradients are unscaled (training.engine.Zero hands them over afterwards).
"""
from __future__ import annotations

import torch

INIT, GROWTH_INTERVAL, MAX = 2.0**16, 2000, 2.0**24


class LossScale:
    """The factor the loss is multiplied by before backward, and the rule that moves it. Disabled (a
    network that is not fp16) it is 1 and never moves."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.value = INIT if enabled else 1.0
        self.good_steps = 0

    def unscale(self, params: list[torch.Tensor]) -> None:
        """Divide the gradients (fp32: the trainables are) by the scale: the optimizer sees the loss's own."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.enabled and grads:
            torch._foreach_mul_(grads, 1.0 / self.value)

    def stepped(self) -> None:
        """A step was taken: after GROWTH_INTERVAL in a row the scale doubles (up to MAX)."""
        if not self.enabled:
            return
        self.good_steps += 1
        if self.good_steps % GROWTH_INTERVAL == 0:
            self.value = min(self.value * 2.0, MAX)

    def overflowed(self) -> bool:
        """A gradient was not finite: while the scale is above 1 that is the scale's overflow, and it
        halves (True: skip the step without counting it); at 1, the gradients' own (False)."""
        if not self.enabled or self.value <= 1.0:
            return False
        self.value, self.good_steps = self.value / 2.0, 0
        return True

    def state_dict(self) -> dict:
        return {"value": self.value, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.good_steps = float(state["value"]), int(state["good_steps"])
