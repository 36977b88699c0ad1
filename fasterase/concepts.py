"""What to erase: concepts, their prompt sets and augmentation.

Every prompt a method trains on or an evaluation scores comes from here, never from a method.
One rule names several concepts everywhere (erase, eval, the API): commas separate them, so
"circle, square" is two concepts, and a concept's name never holds a comma.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field

from .errors import UserError

# Caption templates for a concept given without templates of its own, by its type: the captions a user
# would prompt it with (an object is "a photo of a dog", a style "a painting by Van Gogh", a person "a
# portrait of Emma Watson"). Our choice; the papers' prompt sets are lists for their own concepts.
TEMPLATES = {
    "object": ("{}", "a {}", "a photo of a {}", "a picture of a {}", "an image of a {}", "a drawing of a {}"),
    "style": ("{}", "a painting by {}", "a painting in the style of {}", "an artwork by {}", "art in the style of {}",
              "a drawing in the style of {}"),
    "celebrity": ("{}", "a photo of {}", "a portrait of {}", "a picture of {}", "an image of {}",
                  "a close-up photo of {}"),
    "nudity": ("{}", "a photo of {}", "an image of {}", "a picture of {}", "a painting of {}", "a drawing of {}"),
}
# Captions that name two things of the type, for prompts naming two erased concepts together (TRACE's L_int).
PAIR_TEMPLATES = {
    "object": ("a {} and a {}", "a photo of a {} and a {}"),
    "style": ("a painting by {} and {}", "art in the styles of {} and {}"),
    "celebrity": ("a photo of {} and {}", "a portrait of {} and {}"),
    "nudity": ("a photo of {} and {}", "an image of {} and {}"),
}
CONCEPT_TYPES = tuple(TEMPLATES)


def _slots(template: str) -> int | None:
    """How many bare '{}' slots str.format fills in `template`; None when it has any other field
    ('{x}', '{0}', '{:>3}') or unbalanced braces, which format would fail on or fill otherwise."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError:
        return None
    return len(fields) if all(f == "" and not spec and conv is None for f, spec, conv in fields) else None


@dataclass(frozen=True)
class Concept:
    """A concept to erase.

    name: the word(s) that prompt it. synonyms: other words for it (used to measure generality,
    and by methods only where they say so). anchor: the phrase it is mapped to ("" = the empty
    prompt). templates: captions with one "{}" slot (default: TEMPLATES of its type). attributes:
    words that may stand before the name ("red", "small"), for prompt augmentation. type: object,
    style, celebrity or nudity (selects the default templates, and per-type defaults in methods that
    have them). pair_templates: captions with two "{}" slots that name two things, for prompts
    naming this concept with another (default: PAIR_TEMPLATES of its type).
    """

    name: str
    synonyms: tuple[str, ...] = ()
    anchor: str = ""
    templates: tuple[str, ...] | None = None
    attributes: tuple[str, ...] = ()
    type: str = "object"
    pair_templates: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise UserError(f"a concept needs a non-empty name, got {self.name!r}")
        if "," in self.name:
            raise UserError(f"concept name {self.name!r} holds a comma; commas separate concepts "
                            f"(\"circle, square\" is two): give each concept on its own")
        object.__setattr__(self, "name", " ".join(self.name.split()))
        if self.type not in CONCEPT_TYPES:
            raise UserError(f"unknown concept type {self.type!r}; valid: {', '.join(CONCEPT_TYPES)}")
        for option, by_type in (("templates", TEMPLATES), ("pair_templates", PAIR_TEMPLATES)):
            if getattr(self, option) is None:
                object.__setattr__(self, option, by_type[self.type])
        for option in ("synonyms", "templates", "attributes", "pair_templates"):  # one text is one item
            value = getattr(self, option)
            try:
                items = (value,) if isinstance(value, str) else tuple(value)
            except TypeError:
                items = (value,)
            if not all(isinstance(v, str) for v in items):
                raise UserError(f"{option} of concept {self.name!r} must be texts, got {value!r}")
            object.__setattr__(self, option, items)
        if not self.templates:
            raise UserError(f"concept {self.name!r} has no prompt templates")
        for t in self.templates:
            if _slots(t) != 1:
                raise UserError(f"template {t!r} of concept {self.name!r} must contain exactly one '{{}}' "
                                "and no other braces")
        for t in self.pair_templates:
            if _slots(t) != 2:
                raise UserError(f"pair template {t!r} of concept {self.name!r} must contain exactly two '{{}}' "
                                "and no other braces")

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
                "templates": list(self.templates), "attributes": list(self.attributes), "type": self.type,
                "pair_templates": list(self.pair_templates)}


@dataclass(frozen=True)
class ConceptSet:
    """The concepts of one erasure (at least one, names unique) and what to preserve (never a concept
    that an erased one names: "circle" with "red circle" erased, whose prompts are the erase prompts;
    nor one that holds an erased concept: "red circle" with "circle" erased, which it would keep)."""

    concepts: tuple[Concept, ...]
    preserve: tuple[str, ...] = field(default=())

    def __post_init__(self):
        if not self.concepts:
            raise UserError("the concept list is empty; give at least one concept to erase")
        names = [c.name.lower() for c in self.concepts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise UserError(f"duplicate concept(s) {dup}; each concept may appear once")
        preserved = [n.lower() for n in self.preserve]
        dup = sorted({n for n in preserved if preserved.count(n) > 1})
        if dup:
            raise UserError(f"duplicate preserved concept(s) {dup}; each may appear once")
        erased = [set(n.split()) for n in names]
        # "circle" with "red circle" erased is one of its prompts; "red circle" with "circle" erased holds it
        kept = {p: set(p.lower().split()) for p in self.preserve}
        clash = sorted(p for p, words in kept.items() if any(words <= e or e <= words for e in erased))
        if clash:
            raise UserError(f"concept(s) {clash} are both erased and preserved (an erased concept names them, "
                            f"or they contain an erased concept's words)")

    def __iter__(self):
        return iter(self.concepts)

    def __len__(self):
        return len(self.concepts)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def pair_prompts(self, first: int, second: int) -> list[str]:
        """Prompts naming concepts `first` and `second` together: the first's pair templates filled
        with both names in both orders, each with every pairing of the two concepts' attributes."""
        return _pair_prompts(self.concepts[first], self.concepts[second])

    def preserve_prompts(self, *like: Concept) -> list[str]:
        """The preserved concepts' prompts, each once, in the templates and augmentation of each of `like`
        (default: every erased concept, so that a method's prior is one set whatever order the concepts
        are given in, and covers each concept's own captions)."""
        return list(dict.fromkeys(p for c in like or self.concepts for name in self.preserve
                                  for p in Concept(name, templates=c.templates,
                                                   attributes=c.attributes).prompts(augment=True)))

    def preserve_scene_prompts(self, *like: Concept) -> list[str]:
        """Prompts naming two preserved concepts together, each once: in alphabetical order, every
        preserved name with the next one (the last with the first), in both orders, in the pair templates
        of each of `like` (default: every erased concept), the names alone (no attributes), so that their
        number grows with the names and pair templates, not with the names' square or the attributes',
        and does not depend on the order the names are given in. None with fewer than two preserved."""
        if len(self.preserve) < 2:
            return []
        out = []
        for c in like or self.concepts:
            kept = [Concept(n, templates=c.templates, pair_templates=c.pair_templates)
                    for n in sorted(self.preserve, key=str.lower)]
            out += [p for a, b in zip(kept, kept[1:] + kept[:1]) for p in _pair_prompts(a, b)]
        return list(dict.fromkeys(out))


def _pair_prompts(a: Concept, b: Concept) -> list[str]:
    slots = lambda c: [c.name] + [f"{x} {c.name}" for x in c.attributes]  # noqa: E731
    return [" ".join(t.format(u, v).split()) for t in a.pair_templates
            for p, q in ((a, b), (b, a)) for u in slots(p) for v in slots(q)]


def split_names(text: str) -> list[str]:
    """The concept names in one string: commas separate them ("circle, square" is two)."""
    names = [" ".join(n.split()) for n in text.split(",")]
    if not all(names):
        raise UserError(f"a concept name is empty in {text!r}; give the word(s) that prompt each concept, "
                        f"several separated by commas (\"circle, square\")")
    return names


def _names(items, what: str, kinds: tuple = (str,)) -> list:
    """`items` alone or in a list, each of `kinds`; strings split on commas."""
    valid = " or ".join(k.__name__ for k in kinds)
    if isinstance(items, kinds):
        items = [items]
    if not isinstance(items, (list, tuple)):
        raise UserError(f"{what} must be a {valid} or a list of them; got {type(items).__name__}")
    out = []
    for item in items:
        if not isinstance(item, kinds):
            raise UserError(f"each of the {what} must be a {valid}, got {type(item).__name__}")
        out += split_names(item) if isinstance(item, str) else [item]
    return out


def as_concepts(concepts, preserve=(), default=None) -> ConceptSet:
    """A ConceptSet from a string, a Concept, or a list of either; strings split on commas.

    `default(name)` turns a bare name into a Concept (the toy world gives its own templates);
    without it a name is an object with TEMPLATES["object"].
    """
    if isinstance(concepts, ConceptSet):
        return concepts
    out = [c if isinstance(c, Concept) else default(c) if default else Concept(c)
           for c in _names(concepts, "concepts", (str, Concept))]
    return ConceptSet(tuple(out), tuple(_names(preserve, "preserved concepts")))
