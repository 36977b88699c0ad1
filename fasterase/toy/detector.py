"""Multi-label shape and colour classifier: the concept detector of every toy evaluation.

For each shape it says whether the image shows it, and for each shape it shows, in which colour
(one of COLOR_CLASSES: the four colour concepts and the neutral grey). An image with no shape
shows none: the detector is trained on empty backgrounds and decoded noise as well.
"""
from __future__ import annotations

import torch
from torch import nn

from . import shapes


class Detector(nn.Module):
    def __init__(self):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(),
                                 nn.Conv2d(o, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, 32), block(32, 64), block(64, 64), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * (shapes.HEIGHT // 8) * (shapes.WIDTH // 8), 256), nn.SiLU())
        self.present_head = nn.Linear(256, len(shapes.SHAPES))
        self.color_head = nn.Linear(256, len(shapes.SHAPES) * len(shapes.COLOR_CLASSES))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, 32, 48) in [-1, 1] -> (presence logits (N, 5), colour logits (N, 5, 5):
        per shape, over COLOR_CLASSES)."""
        h = self.hidden(self.features(images))
        return self.present_head(h), self.color_head(h).view(len(h), len(shapes.SHAPES), len(shapes.COLOR_CLASSES))

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> list[dict[str, str]]:
        """Per image, {shape: colour} for every shape it shows (empty for none)."""
        present, color = self(images.float())
        present, color = (present > 0).tolist(), color.argmax(-1).tolist()
        return [{s: shapes.COLOR_CLASSES[c[k]] for k, s in enumerate(shapes.SHAPES) if p[k]}
                for p, c in zip(present, color)]


def load(directory=None) -> Detector:
    from .components import WEIGHTS, load_weights

    return load_weights(Detector(), "detector", directory or WEIGHTS)
