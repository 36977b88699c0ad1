"""The toy world's concepts: its shapes, with the world's caption templates and synonyms."""
from __future__ import annotations

from ..concepts import Concept
from ..errors import UserError
from . import shapes

# The world's captions with "{color} {shape}" as one slot: "a photo of a {}".
TEMPLATES = tuple(t.replace("{color} {shape}", "{}") for t in shapes.COLOR_TEMPLATES)


def concept(name: str) -> Concept:
    """A toy concept: the world's templates, its colours as attributes for augmentation, and
    (for shapes that have them) synonyms, which methods do not train on: they measure generality."""
    return Concept(name, synonyms=shapes.SYNONYMS.get(name, ()), templates=TEMPLATES, attributes=shapes.COLORS)


def shapes_named(name: str) -> list[str]:
    """The toy shapes a concept name names, by shape word or synonym: "red circle" and "disk" name
    the circle, "red" none. What eval scores an erased concept by."""
    words = name.lower().split()
    return [s for s in shapes.SHAPES if any(w in words for w in (s, *shapes.SYNONYMS.get(s, ())))]


def check_erasable(names: list[str]) -> None:
    """The toy world's erasable concepts name a toy shape (or its synonym): its images are shapes,
    and an edit of anything else would change nothing that eval could score. Colours are not
    erasable yet: every shape is drawn in every colour, so "red" sits in the preserved prompts."""
    bad = [n for n in names if not shapes_named(n)]
    if bad:
        raise UserError(f"concept(s) {bad} name no toy shape; the toy world erases its shapes: name one of "
                        f"{', '.join(shapes.SHAPES)} (or a synonym: "
                        f"{', '.join(w for ws in shapes.SYNONYMS.values() for w in ws)})")


def preserve_for(names: list[str]) -> list[str]:
    """The toy shapes that no erased concept names: what erasure must leave drawable."""
    named = {s for n in names for s in shapes_named(n)}
    return [s for s in shapes.SHAPES if s not in named]
