"""FADE's concept discriminator D_phi (Sec. 4.1), also TRACE's default concept scorer: one logit per erased concept, "is concept k in
this image", trained from scratch on the model's own generations and never on the evaluation's
detector or data.

It reads clean latents (the x_0 a prediction implies, unpacked to (N, C, h, w)), not decoded
images: the removal loss back-propagates through D into the denoiser at every step, and through a
VAE decoder that would add a network as large as SD's UNet at full resolution to every step's
forward and backward. D is trained on the same kind of input it is asked about (one-step x_0
predictions from the model's own rollouts). A small CNN: strided convolutions, GroupNorm (no batch
statistics, so a sample's logit does not depend on its batch), global average pooling, so one
network reads the toy world's 8x12 latents, SD1.5's 64x64 and FLUX's 128x128 alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .loop import NonFiniteLoss


class ConceptDiscriminator(nn.Module):
    def __init__(self, channels: int, concepts: int, width: int = 32):
        super().__init__()
        layers, c = [], channels
        for i, w in enumerate((width, width, 2 * width, 2 * width)):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, w), nn.SiLU()]
            c = w
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(c, concepts)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (N, C, h, w) float -> logits (N, concepts), fp32."""
        return self.head(self.features(latents.float()))


def discriminator_loss(logits: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """Eq. L_adv^D of Sec. 4.1, per head: binary cross-entropy with head k's target 1 on a generation
    from concept k's prompts and 0 on every other (the neutral prompts' ones, and the other concepts').
    logits (N, K); concept (N,) long: the concept index, -1 for a neutral prompt. Mean over N and K."""
    concept = concept.to(logits.device)
    target = F.one_hot(concept.clamp(min=0), logits.shape[1]).float() * (concept >= 0).float()[:, None]
    return F.binary_cross_entropy_with_logits(logits, target)


def removal_loss(logits: torch.Tensor, concept: torch.Tensor) -> torch.Tensor:
    """L_rem = -log(1 - D_k(x)) (Sec. 4.1) on each generation's own concept head k, mean over N:
    -log(1 - sigmoid(z)) = softplus(z). logits (N, K); concept (N,) long, every entry >= 0."""
    concept = concept.to(logits.device)
    return F.softplus(logits.gather(1, concept[:, None]).squeeze(1)).mean()


@torch.no_grad()
def accuracy(logits: torch.Tensor, concept: torch.Tensor) -> float:
    """How often D is right about its own head: a concept-k generation's head k says present (logit
    > 0), a neutral one's heads all say absent. 0.5 is chance on balanced batches."""
    concept = concept.to(logits.device)
    present = logits > 0
    own = present.gather(1, concept.clamp(min=0)[:, None]).squeeze(1)
    right = torch.where(concept >= 0, own, ~present.any(dim=1))
    return float(right.float().mean())


@torch.no_grad()
def mean_outputs(logits: torch.Tensor, concept: torch.Tensor, head: torch.Tensor) -> tuple[float, float]:
    """D's mean probability "present" on each generation's own head (`head` (N,) long: its concept, or
    the concept a neutral generation is paired with), over the concept generations and over the neutral
    ones: both 0.5 when D cannot tell them apart (fade.txt Sec. 4.3: "output ~ 0.5 for both x_c and x_-c")."""
    p = torch.sigmoid(logits.float()).gather(1, head.to(logits.device)[:, None]).squeeze(1)
    present = concept.to(logits.device) >= 0
    return float(p[present].mean()), float(p[~present].mean())


def train_step(d: ConceptDiscriminator, optimizer: torch.optim.Optimizer, latents: torch.Tensor,
               concept: torch.Tensor) -> float:
    """One optimizer step of D on discriminator_loss; D's parameters require grad only inside it, so
    the losses that read D elsewhere never train it. Raises NonFiniteLoss on a NaN or infinite loss."""
    d.requires_grad_(True)
    try:
        loss = discriminator_loss(d(latents), concept)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"the discriminator's loss is not finite ({loss.item()}); stopping. Lower its "
                                "learning rate.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    finally:
        d.requires_grad_(False)
    return loss.item()
