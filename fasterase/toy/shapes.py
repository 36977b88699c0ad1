"""The toy world's ground truth: coloured shapes on white, with captions.

Everything the toy pipelines know comes from here, so erasure in the toy world is measurable:
a detector trained on these images says which shape and colour a generated image shows.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "green", "blue", "yellow")
SYNONYMS = {"circle": ("disk",), "square": ("box",)}
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
}
# Caption templates; "{shape}" may be a synonym, "{color}" is optional in some.
COLOR_TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "a {color} {shape} on a white background",
    "a drawing of a {color} {shape}",
    "an image of a {color} {shape}",
    "a picture of a {color} {shape}",
)
SHAPE_TEMPLATES = (
    "a {shape}",
    "a photo of a {shape}",
    "a {shape} on a white background",
    "a drawing of a {shape}",
)
SIZE = 32
_SUPER = 4  # supersampling factor for anti-aliased edges


def caption(shape_word: str, color: str | None, template: str) -> str:
    # every colour and shape word starts with a consonant sound, so "a" is always right
    return " ".join(template.format(shape=shape_word, color=color or "").split())


def _mask(shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean masks (N, S, S) at the supersampled grid for one shape kind."""
    s = SIZE * _SUPER
    g = (np.arange(s) + 0.5) / _SUPER
    y = g[None, :, None] - cy[:, None, None]
    x = g[None, None, :] - cx[:, None, None]
    r = r[:, None, None]
    if shape == "circle":
        return x * x + y * y <= r * r
    if shape == "square":
        return (np.abs(x) <= 0.85 * r) & (np.abs(y) <= 0.85 * r)
    if shape == "triangle":  # apex up, base at +0.7r
        top, base = -r, 0.7 * r
        return (y <= base) & (y >= top) & (np.abs(x) <= (y - top) / (base - top) * 1.05 * r)
    if shape == "cross":
        arm = 0.32 * r
        return ((np.abs(x) <= r) & (np.abs(y) <= arm)) | ((np.abs(y) <= r) & (np.abs(x) <= arm))
    if shape == "star":
        inner = 0.42 * r
        out = x * x + y * y <= inner * inner
        for k in range(5):
            a = -np.pi / 2 + k * 2 * np.pi / 5
            tip = (np.cos(a) * r, np.sin(a) * r)
            b1 = (np.cos(a - np.pi / 5) * inner, np.sin(a - np.pi / 5) * inner)
            b2 = (np.cos(a + np.pi / 5) * inner, np.sin(a + np.pi / 5) * inner)
            out |= _in_triangle(x, y, tip, b1, b2)
        return out
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(SHAPES)}")


def _in_triangle(x, y, p0, p1, p2):
    def side(a, b):
        return (x - b[0]) * (a[1] - b[1]) - (a[0] - b[0]) * (y - b[1])

    d0, d1, d2 = side(p0, p1), side(p1, p2), side(p2, p0)
    neg = (d0 < 0) | (d1 < 0) | (d2 < 0)
    pos = (d0 > 0) | (d1 > 0) | (d2 > 0)
    return ~(neg & pos)


def render(shapes, colors, rng: np.random.Generator) -> np.ndarray:
    """Render images (N, 3, 32, 32) float32 in [-1, 1]; shape None draws an empty background.

    Position is near the centre (+-3 px), half-size 7..11 px, colour jittered by +-12 per channel.
    """
    n = len(shapes)
    cx = SIZE / 2 + rng.uniform(-3, 3, n)
    cy = SIZE / 2 + rng.uniform(-3, 3, n)
    r = rng.uniform(7, 11, n)
    jitter = rng.uniform(-12, 12, (n, 3))
    cover = np.zeros((n, SIZE * _SUPER, SIZE * _SUPER), dtype=np.float32)
    for kind in set(s for s in shapes if s is not None):
        idx = np.array([i for i, s in enumerate(shapes) if s == kind])
        cover[idx] = _mask(kind, cx[idx], cy[idx], r[idx])
    cover = cover.reshape(n, SIZE, _SUPER, SIZE, _SUPER).mean(axis=(2, 4))
    rgb = np.array([RGB[c] if c is not None else (255, 255, 255) for c in colors], np.float32)
    rgb = np.clip(rgb + jitter, 0, 255)
    img = 255.0 + cover[:, None] * (rgb[:, :, None, None] - 255.0)
    return (img / 127.5 - 1.0).astype(np.float32)


def sample(n: int, rng: np.random.Generator, p_synonym=0.25, p_no_color=0.15, p_empty=0.1, p_no_shape=0.05):
    """A training batch: images, captions, shape and colour indices.

    Caption '' (dropout for classifier-free guidance) keeps its image. A caption with the shape
    word left out ("a photo of a red") shows no shape: in this world, as in real ones, a prompt
    that names no object gets none, so a concept mapped to the empty prompt disappears.
    Index -1 marks a missing shape or colour.
    """
    s_idx = rng.integers(0, len(SHAPES), n)
    c_idx = rng.integers(0, len(COLORS), n)
    caps = []
    for i, (s, c) in enumerate(zip(s_idx, c_idx)):
        shape, color = SHAPES[s], COLORS[c]
        word = shape
        if shape in SYNONYMS and rng.random() < p_synonym:
            word = SYNONYMS[shape][rng.integers(len(SYNONYMS[shape]))]
        u = rng.random()
        if u < p_empty:
            caps.append("")
        elif u < p_empty + p_no_shape:
            caps.append(caption("", color, COLOR_TEMPLATES[rng.integers(len(COLOR_TEMPLATES))]))
            s_idx[i] = c_idx[i] = -1
        elif u < p_empty + p_no_shape + p_no_color:
            caps.append(caption(word, None, SHAPE_TEMPLATES[rng.integers(len(SHAPE_TEMPLATES))]))
        else:
            caps.append(caption(word, color, COLOR_TEMPLATES[rng.integers(len(COLOR_TEMPLATES))]))
    images = render([SHAPES[s] if s >= 0 else None for s in s_idx], [COLORS[c] if c >= 0 else None for c in c_idx],
                    rng)
    return images, caps, s_idx, c_idx


def vocabulary() -> list[str]:
    """Every word the toy tokenizer knows, in a fixed order."""
    words = []
    for t in COLOR_TEMPLATES + SHAPE_TEMPLATES:
        words += t.replace("{shape}", "").replace("{color}", "").split()
    words += list(SHAPES) + [w for syn in SYNONYMS.values() for w in syn] + list(COLORS)
    # neutral words used as anchors/guides by erasure methods; they never appear in training
    words += ["shape", "object", "thing", "blank", "nothing", "empty", "background"]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
