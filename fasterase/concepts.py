"""What to erase: concepts, their prompt sets and augmentation.

Every prompt a method trains on or an evaluation scores comes from here, never from a method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Generic caption templates for a concept with no templates of its own.
DEFAULT_TEMPLATES = (
    "{}",
    "a {}",
    "a photo of a {}",
    "a picture of a {}",
    "an image of a {}",
    "a drawing of a {}",
)
CONCEPT_TYPES = ("object", "celebrity", "style", "nudity")


@dataclass(frozen=True)
class Concept:
    """A concept to erase.

    name: the word(s) that prompt it. synonyms: other words for it (used to measure generality,
    and by methods only where they say so). anchor: the phrase it is mapped to ("" = the empty
    prompt). templates: captions with one "{}" slot. attributes: words that may stand before the
    name ("red", "small"), for prompt augmentation. type: object, celebrity, style or nudity
    (selects per-type defaults in methods that have them).
    """

    name: str
    synonyms: tuple[str, ...] = ()
    anchor: str = ""
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    attributes: tuple[str, ...] = ()
    type: str = "object"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a concept needs a non-empty name, got {self.name!r}")
        object.__setattr__(self, "name", " ".join(self.name.split()))
        object.__setattr__(self, "synonyms", tuple(self.synonyms))
        object.__setattr__(self, "templates", tuple(self.templates))
        object.__setattr__(self, "attributes", tuple(self.attributes))
        if self.type not in CONCEPT_TYPES:
            raise ValueError(f"unknown concept type {self.type!r}; valid: {', '.join(CONCEPT_TYPES)}")
        if not self.templates:
            raise ValueError(f"concept {self.name!r} has no prompt templates")
        for t in self.templates:
            if t.count("{}") != 1:
                raise ValueError(f"template {t!r} of concept {self.name!r} must contain exactly one '{{}}'")

    def _fill(self, word: str, augment: bool) -> list[str]:
        slots = [word] + ([f"{a} {word}" for a in self.attributes] if augment else [])
        return [" ".join(t.format(s).split()) for s in slots for t in self.templates]

    def prompts(self, augment: bool = False) -> list[str]:
        """Every template filled with the name; with augment, also with each attribute before it."""
        return self._fill(self.name, augment)

    def anchor_prompts(self, augment: bool = False) -> list[str]:
        """The guide of each of prompts(augment): the same caption with the anchor for the name."""
        return self._fill(self.anchor, augment)

    def synonym_prompts(self, augment: bool = False) -> list[str]:
        return [p for s in self.synonyms for p in self._fill(s, augment)]

    def to_dict(self) -> dict:
        return {"name": self.name, "synonyms": list(self.synonyms), "anchor": self.anchor,
                "templates": list(self.templates), "attributes": list(self.attributes), "type": self.type}


@dataclass(frozen=True)
class ConceptSet:
    """The concepts of one erasure (at least one, names unique) and what to preserve."""

    concepts: tuple[Concept, ...]
    preserve: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.concepts:
            raise ValueError("the concept list is empty; give at least one concept to erase")
        names = [c.name.lower() for c in self.concepts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate concept(s) {dup}; each concept may appear once")
        clash = sorted(set(names) & {p.lower() for p in self.preserve})
        if clash:
            raise ValueError(f"concept(s) {clash} are both erased and preserved")

    def __iter__(self):
        return iter(self.concepts)

    def __len__(self):
        return len(self.concepts)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def preserve_prompts(self, like: Concept) -> list[str]:
        """The preserved concepts' prompts, with the templates and augmentation of `like`."""
        return [p for name in self.preserve for p in Concept(name, templates=like.templates,
                                                               attributes=like.attributes).prompts(augment=True)]


def as_concepts(concepts, preserve=(), default=None) -> ConceptSet:
    """A ConceptSet from a string, a Concept, or a list of either.

    `default(name)` turns a bare name into a Concept (the toy world gives its own templates);
    without it a name gets DEFAULT_TEMPLATES.
    """
    if isinstance(concepts, (str, Concept)):
        concepts = [concepts]
    if isinstance(concepts, ConceptSet):
        return concepts
    if not isinstance(concepts, (list, tuple)):
        raise TypeError(f"concepts must be a string, a Concept, or a list of them; got {type(concepts).__name__}")
    out = []
    for c in concepts:
        if isinstance(c, Concept):
            out.append(c)
        elif isinstance(c, str):
            if not c.strip():
                raise ValueError("a concept name is empty; give the word(s) that prompt the concept")
            out.append(default(c.strip()) if default else Concept(c))
        else:
            raise TypeError(f"a concept must be a string or a Concept, got {type(c).__name__}")
    if isinstance(preserve, str):
        preserve = [preserve]
    return ConceptSet(tuple(out), tuple(preserve))
