"""Shape and colour classifier: the concept detector of every toy evaluation.

Its shape head has one class more than there are shapes, "none", trained on empty
backgrounds and on noise, so an image with no shape in it is not counted as some shape.
"""
from __future__ import annotations

import torch
from torch import nn

from . import shapes

NONE = len(shapes.SHAPES)  # index of the "none" shape class


class Detector(nn.Module):
    def __init__(self):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * 16, 128), nn.SiLU())
        self.shape_head = nn.Linear(128, len(shapes.SHAPES) + 1)
        self.color_head = nn.Linear(128, len(shapes.COLORS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, 32, 32) in [-1, 1] -> (shape logits, colour logits)."""
        h = self.hidden(self.features(images))
        return self.shape_head(h), self.color_head(h)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> tuple[list[str], list[str]]:
        """Names of the predicted shape ('none' for no shape) and colour of each image."""
        s, c = self(images.float())
        names = list(shapes.SHAPES) + ["none"]
        return [names[i] for i in s.argmax(1).tolist()], [shapes.COLORS[i] for i in c.argmax(1).tolist()]


def load(directory=None) -> Detector:
    from .components import WEIGHTS, load_weights

    return load_weights(Detector(), "detector", directory or WEIGHTS)
