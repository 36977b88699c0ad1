"""The toy world's concepts: its shapes, with the world's caption templates and synonyms."""
from __future__ import annotations

from ..concepts import Concept
from . import shapes


def concept(name: str) -> Concept:
    """A shape as a Concept: every colour x colour template, plus the colourless templates.

    Synonyms are attached for evaluation (generality); methods train on prompts() only.
    """
    if name not in shapes.SHAPES:
        return Concept(name, templates=tuple(t.replace("{shape}", "{}") for t in shapes.SHAPE_TEMPLATES))
    templates = [t.replace("{shape}", "{}").replace("{color}", c) for c in shapes.COLORS for t in shapes.COLOR_TEMPLATES]
    templates += [t.replace("{shape}", "{}") for t in shapes.SHAPE_TEMPLATES]
    return Concept(name, synonyms=shapes.SYNONYMS.get(name, ()), templates=tuple(templates))


def preserve_for(names: list[str]) -> list[str]:
    """The toy shapes that are not erased: what erasure must leave drawable."""
    return [s for s in shapes.SHAPES if s not in names]
