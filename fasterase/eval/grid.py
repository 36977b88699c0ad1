"""Image grids for looking at what a model draws."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from ..files import check_writable, set_default_mode

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_grid_path(path: str | Path) -> Path:
    """The path a grid may be written to, checked before any image is drawn: a .png file in an
    existing folder, new or an existing PNG (which it replaces); never a folder or any other file."""
    path = Path(path).expanduser()
    if path.suffix.lower() != ".png":
        raise UserError(f"grid {path} must be a .png file")
    if not path.parent.is_dir():
        raise UserError(f"grid {path}: its folder {path.parent} does not exist (or is a file); create it first")
    check_writable(path.parent, f"grid {path}")
    if path.is_dir():
        raise UserError(f"grid {path} is a folder; name a .png file")
    if path.exists():
        with open(path, "rb") as f:
            if f.read(len(PNG_MAGIC)) != PNG_MAGIC:
                raise UserError(f"grid {path} exists and is not a PNG image; only a PNG is replaced: "
                                "name a new file")
    return path


def save_grid(images: torch.Tensor, path: str | Path, columns: int) -> Path:
    """Write images (N, 3, H, W) in [0, 1] as one PNG, `columns` per row, atomically, to a path
    check_grid_path accepts. Small images (the toy world's 32x48) are enlarged, nearest-neighbour, to at
    least 128 px on their short side; real-size ones stay as drawn."""
    path = check_grid_path(path)
    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = np.ones((rows * (h + 2), columns * (w + 2), 3), np.uint8) * 255
    pixels = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = pixels[i]
    img = Image.fromarray(canvas)
    scale = max(1, -(-128 // min(h, w)))
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            img.save(f, format="PNG")
        set_default_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path

