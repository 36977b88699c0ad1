"""The toy world's ground truth: one or two coloured shapes on white, with captions.

Everything the toy pipelines know comes from here, so erasure in the toy world is measurable:
a detector trained on these images says which shapes an image shows, and in which colour.

An image is a list of objects, each a (shape, colour) pair: none (an empty background), one
(near the centre) or two (the first named on the left, the second on the right: the caption gives
the layout). A caption may name a shape without a colour ("a photo of a circle"): the shape is
then drawn in any colour, as a real model draws a cat of any colour when none is named, so a prompt
that names only the shape stands for the shape in every colour. Grey is the neutral colour: it can
be named ("a grey circle"), and it is what colour erasure maps a colour to, but it is not itself a
concept to erase or score.
"""
from __future__ import annotations

import numpy as np

SHAPES = ("circle", "square", "triangle", "cross", "star")
COLORS = ("red", "green", "blue", "yellow")  # the colours that are concepts (erased and scored)
NEUTRAL_COLOR = "grey"  # the anchor of colour erasure
COLOR_CLASSES = COLORS + (NEUTRAL_COLOR,)  # every colour a caption names or an image shows
SYNONYMS = {"circle": ("disk",), "square": ("box",)}
RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "grey": (110, 110, 110),
}
# One-object caption templates. "{color}" may be left empty ("a photo of a circle").
# TEMPLATES are what a method may train on; HELDOUT_TEMPLATES appear only in the world's own
# training captions and in evaluation, so evaluation can ask whether an erasure holds on
# prompts the method never saw.
TEMPLATES = (
    "a {color} {shape}",
    "a photo of a {color} {shape}",
    "a {color} {shape} on a white background",
    "a drawing of a {color} {shape}",
)
HELDOUT_TEMPLATES = (
    "an image of a {color} {shape}",
    "a picture of a {color} {shape}",
)
# Two-object templates: "{first}" is drawn on the left, "{second}" on the right.
SCENE_TEMPLATES = (
    "a {first} and a {second}",
    "a photo of a {first} and a {second}",
    "a {first} next to a {second}",
)
HEIGHT, WIDTH = 32, 48
_SUPER = 4  # supersampling factor for anti-aliased edges
# Object centres (x) and half-sizes (px): one object in the middle, two side by side.
_SINGLE = {"x": (WIDTH / 2,), "r": (7.0, 11.0), "jitter": 3.0}
_PAIR = {"x": (WIDTH / 4, 3 * WIDTH / 4), "r": (6.0, 9.0), "jitter": 2.0}


def phrase(shape_word: str, color: str | None) -> str:
    return f"{color} {shape_word}" if color else shape_word


def caption(template: str, *objects: tuple[str, str | None]) -> str:
    """A caption from a template and its objects (shape word, colour or None). Every colour and
    shape word starts with a consonant sound, so "a" is always right."""
    if "{first}" in template:
        (s1, c1), (s2, c2) = objects
        return template.format(first=phrase(s1, c1), second=phrase(s2, c2))
    (s, c), = objects
    return " ".join(template.format(shape=s, color=c or "").split())


def _mask(shape: str, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean masks (N, H, W) at the supersampled grid for one shape kind."""
    gy = (np.arange(HEIGHT * _SUPER) + 0.5) / _SUPER
    gx = (np.arange(WIDTH * _SUPER) + 0.5) / _SUPER
    y = gy[None, :, None] - cy[:, None, None]
    x = gx[None, None, :] - cx[:, None, None]
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


def render(scenes: list[list[tuple[str, str]]], rng: np.random.Generator) -> np.ndarray:
    """Images (N, 3, 32, 48) float32 in [-1, 1] of scenes of 0, 1 or 2 (shape, colour) objects.

    One object: centre (24, 16) +-3 px, half-size 7..11 px. Two: centres x = 12 and 36 (+-2 px),
    y = 16 +-3, half-size 6..9 px, first on the left. Colour jittered by +-12 per channel.
    """
    if any(len(sc) > 2 for sc in scenes):
        raise ValueError("a toy scene holds at most two objects")
    img = np.full((len(scenes), 3, HEIGHT, WIDTH), 255.0, np.float32)
    for n_obj, layout in ((1, _SINGLE), (2, _PAIR)):
        idx = np.array([i for i, sc in enumerate(scenes) if len(sc) == n_obj], dtype=int)
        for slot in range(n_obj):
            m = len(idx)
            cx = layout["x"][slot] + rng.uniform(-layout["jitter"], layout["jitter"], m)
            cy = HEIGHT / 2 + rng.uniform(-3, 3, m)
            r = rng.uniform(*layout["r"], m)
            jitter = rng.uniform(-12, 12, (m, 3))
            cover = np.zeros((m, HEIGHT * _SUPER, WIDTH * _SUPER), dtype=np.float32)
            kinds = [scenes[i][slot][0] for i in idx]
            for kind in set(kinds):
                sel = np.array([j for j, k in enumerate(kinds) if k == kind])
                cover[sel] = _mask(kind, cx[sel], cy[sel], r[sel])
            cover = cover.reshape(m, HEIGHT, _SUPER, WIDTH, _SUPER).mean(axis=(2, 4))
            rgb = np.array([RGB[scenes[i][slot][1]] for i in idx], np.float32).reshape(m, 3)
            rgb = np.clip(rgb + jitter, 0, 255)
            img[idx] += cover[:, None] * (rgb[:, :, None, None] - img[idx])
    return (img / 127.5 - 1.0).astype(np.float32)


def labels(scenes: list[list[tuple[str, str]]]) -> tuple[np.ndarray, np.ndarray]:
    """Detector targets: presence (N, 5) float32 per shape, and colour (N, 5) int64 as an index into
    COLOR_CLASSES per shape, -1 where the shape is absent."""
    present = np.zeros((len(scenes), len(SHAPES)), np.float32)
    color = np.full((len(scenes), len(SHAPES)), -1, np.int64)
    for i, sc in enumerate(scenes):
        for s, c in sc:
            present[i, SHAPES.index(s)] = 1.0
            color[i, SHAPES.index(s)] = COLOR_CLASSES.index(c)
    return present, color


def sample(n: int, rng: np.random.Generator, p_empty=0.1, p_no_shape=0.05, p_scene=0.35, p_no_color=0.2,
           p_synonym=0.25):
    """A training batch: images (N, 3, 32, 48), captions, and the scenes drawn.

    Caption '' (dropout for classifier-free guidance) keeps its image. A caption with the shape
    word left out ("a photo of a red") shows no shape: in this world, as in real ones, a prompt
    that names no object gets none, so a concept mapped to the empty prompt disappears. A scene
    holds two different shapes. Every object's colour is drawn from COLOR_CLASSES, and a share
    p_no_color of them leave it unnamed. Captions use every template, held-out ones included.
    """
    single = TEMPLATES + HELDOUT_TEMPLATES
    scenes, caps = [], []
    for _ in range(n):
        u = rng.random()
        if u < p_no_shape:
            color = COLOR_CLASSES[rng.integers(len(COLOR_CLASSES))]
            caps.append(caption(single[rng.integers(len(single))], ("", color)))
            scenes.append([])
            continue
        k = 2 if u < p_no_shape + p_scene else 1
        objects, words = [], []
        for s in rng.choice(len(SHAPES), k, replace=False):
            shape = SHAPES[s]
            word = shape
            if shape in SYNONYMS and rng.random() < p_synonym:
                word = SYNONYMS[shape][rng.integers(len(SYNONYMS[shape]))]
            color = COLOR_CLASSES[rng.integers(len(COLOR_CLASSES))]
            objects.append((shape, color))
            words.append((word, None if rng.random() < p_no_color else color))
        templates = SCENE_TEMPLATES if k == 2 else single
        text = caption(templates[rng.integers(len(templates))], *words)
        caps.append("" if rng.random() < p_empty else text)
        scenes.append(objects)
    return render(scenes, rng), caps, scenes


def vocabulary() -> list[str]:
    """Every word the toy tokenizer knows, in a fixed order."""
    words = []
    for t in TEMPLATES + HELDOUT_TEMPLATES + SCENE_TEMPLATES:
        words += t.replace("{shape}", "").replace("{color}", "").replace("{first}", "").replace(
            "{second}", "").split()
    words += list(SHAPES) + [w for syn in SYNONYMS.values() for w in syn] + list(COLOR_CLASSES)
    # neutral words used as anchors/guides by erasure methods; they never appear in training
    words += ["shape", "object", "thing", "blank", "nothing", "empty", "background"]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out
