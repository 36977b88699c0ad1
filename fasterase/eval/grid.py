"""Image grids for looking at what a model draws."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 4) -> Path:
    """Write images (N, 3, H, W) in [0, 1] as one PNG, `columns` per row, atomically."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 2), columns * (w + 2), 3), np.uint8) * 255
    pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = pixels[i]
    img = Image.fromarray(canvas)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
