"""The toy world's concepts: its shapes (objects) and its colours (a style-like attribute).

A method sees only the world's method templates (shapes.TEMPLATES and SCENE_TEMPLATES); the
held-out templates and the synonyms are for evaluation alone.
"""
from __future__ import annotations

import re

from ..concepts import TEMPLATES as GENERIC_TEMPLATES
from ..concepts import Concept
from ..errors import UserError
from . import shapes

# The method templates with "{color} {shape}" as one slot: "a photo of a {}".
TEMPLATES = tuple(t.replace("{color} {shape}", "{}") for t in shapes.TEMPLATES)
PAIR_TEMPLATES = shapes.SCENE_TEMPLATES  # "a {first} and a {second}": method templates too


def _synonym_list() -> str:
    return ", ".join(w for ws in shapes.SYNONYMS.values() for w in ws)


def concept(name: str) -> Concept:
    """A toy concept. A shape (type "object") gets the method templates, the colours as attributes
    for augmentation, and its synonyms, which methods do not train on: they measure generality. A
    colour (type "style") gets the method templates with every shape after it ("a photo of a {}
    circle"), and the neutral colour as its anchor ("a photo of a grey circle"): the empty word
    would leave the shape in any colour, the erased one included."""
    if colors_named(name) and not shapes_named(name):
        templates = tuple(t.format(f"{{}} {s}") for t in TEMPLATES for s in shapes.SHAPES)
        pairs = tuple(t.format(first=f"{{}} {a}", second=f"{{}} {b}") for t in PAIR_TEMPLATES
                      for a in shapes.SHAPES for b in shapes.SHAPES if a != b)
        return Concept(name, templates=templates, anchor=shapes.NEUTRAL_COLOR, type="style", pair_templates=pairs)
    colors = () if colors_named(name) else shapes.COLORS  # "red circle" is not augmented to "a blue red circle"
    return Concept(name, synonyms=shapes.SYNONYMS.get(name, ()), templates=TEMPLATES, attributes=colors,
                   pair_templates=tuple(t.format(first="{}", second="{}") for t in PAIR_TEMPLATES))


def completed(given: Concept) -> Concept:
    """A Concept given in the toy world (its name checked by check_erasable): one with a name and type
    alone is the world's concept of that name, so Concept("red", type="style") is prompted as "red" is;
    one with any other field set is taken as given. UserError when its type is not the world's for the
    name (a shape is an object, a colour a style)."""
    world = concept(given.name)
    if given.type != world.type:
        raise UserError(f"concept {given.name!r} is of type {world.type!r} in the toy world (a shape is an object, "
                        f"a colour a style), not {given.type!r}")
    return world if given == Concept(given.name, type=given.type) else given


def shapes_named(name: str) -> list[str]:
    """The toy shapes a concept name names, by shape word or synonym: "red circle" and "disk" name
    the circle, "red" none. What eval scores an erased shape concept by."""
    words = name.lower().split()
    return [s for s in shapes.SHAPES if any(w in words for w in (s, *shapes.SYNONYMS.get(s, ())))]


def colors_named(name: str) -> list[str]:
    """The toy colours a name names: "red" and "red circle" name red."""
    words = name.lower().split()
    return [c for c in shapes.COLORS if c in words]


def kind_of(name: str) -> str | None:
    """ "shape" for a name that names a shape ("circle", "red circle", "disk"), "color" for a colour
    alone ("red"), None for anything else."""
    if shapes_named(name):
        return "shape"
    if colors_named(name) and len(name.split()) == 1:
        return "color"
    return None


def check_erasable(names: list[str]) -> None:
    """Toy concepts are shapes or colours, and one edit erases one kind: what a method preserves
    (the other shapes, or the other colours) depends on the kind."""
    grey = [n for n in names if shapes.NEUTRAL_COLOR in n.lower().split()]
    if grey:
        raise UserError(f"concept(s) {grey} name {shapes.NEUTRAL_COLOR}, the toy world's neutral colour: it is what "
                        f"colour erasure maps a colour to, and it cannot be erased; colours to erase: "
                        f"{', '.join(shapes.COLORS)}")
    for kind, named in (("shape", shapes_named), ("colour", colors_named)):
        several = [n for n in names if len(named(n)) > 1]
        if several:
            raise UserError(f"concept(s) {several} name more than one {kind}; separate concepts with commas "
                            f"(\"circle, square\" is two)")
    bad = [n for n in names if kind_of(n) is None]
    if bad:
        raise UserError(f"concept(s) {bad} name no toy shape or colour; the toy world erases a shape "
                        f"({', '.join(shapes.SHAPES)}) or a colour ({', '.join(shapes.COLORS)})")
    known = {*shapes.SHAPES, *shapes.COLORS, *(w for ws in shapes.SYNONYMS.values() for w in ws)}
    extra = {n: [w for w in n.lower().split() if w not in known] for n in names}
    extra = {n: words for n, words in extra.items() if words}
    if extra:  # "a photo of a circle" would erase "a", "photo" and "of" with the circle
        words = ", ".join(w for ws in extra.values() for w in ws)
        raise UserError(f"concept(s) {list(extra)} hold words that are no toy shape or colour ({words}); name the "
                        f"shape ({', '.join(shapes.SHAPES)}), a colour and shape (\"red circle\") or a colour "
                        f"({', '.join(shapes.COLORS)}): the method puts it in its templates (\"a photo of a {{}}\")")
    if len({kind_of(n) for n in names}) > 1:
        raise UserError(f"concepts {names} mix shapes and colours; erase shapes and colours in separate edits "
                        f"(edits stack: apply one, then erase the other)")


def _words(prompt: str) -> str:
    """A prompt as the word-level toy tokenizer reads it: lower case, punctuation gone."""
    return " ".join(re.findall(r"[a-z]+", prompt.lower()))


def check_not_heldout(concepts: list[Concept]) -> None:
    """A method never trains on a held-out prompt or a synonym: a user's concept whose templates
    give one (the generic templates hold "a picture of a {}"), or a concept named by a synonym
    ("disk"), would make the held-out scores or Acc_g meaningless."""
    words = [w for s in shapes.SHAPES for w in (s, *shapes.SYNONYMS.get(s, ()))]
    heldout = {shapes.caption(t, (w, c)) for t in shapes.HELDOUT_TEMPLATES for w in words
               for c in (None, *shapes.COLOR_CLASSES)}
    synonyms = {w for ws in shapes.SYNONYMS.values() for w in ws}
    for c in concepts:
        prompts = [_words(p) for p in c.prompts(augment=True) + c.anchor_prompts(augment=True)]
        hit = sorted({p for p in prompts if p in heldout})
        if hit:
            fix = (f"a Concept given without templates takes the generic {c.type} ones (fasterase.concepts."
                   f"TEMPLATES), which hold them: pass templates=fasterase.toy.concepts.concept({c.name!r}).templates "
                   "(the world's method templates), or give the bare name"
                   if tuple(c.templates) == GENERIC_TEMPLATES.get(c.type) else
                   "give the bare name (the world's method templates) or templates other than "
                   + ", ".join(repr(t) for t in shapes.HELDOUT_TEMPLATES))
            raise UserError(f"concept {c.name!r} would train on the toy world's held-out prompt(s) {hit[:3]}, which "
                            f"only evaluation sees; {fix}")
        said = sorted(synonyms & {w for p in prompts for w in p.split()})
        if said:
            raise UserError(f"concept {c.name!r} would train on the synonym(s) {said}, which evaluation holds out to "
                            f"measure generality (Acc_g); name the shape itself ({_synonym_list()} are held out)")


def preserve_for(names: list[str]) -> list[str]:
    """What erasure must leave drawable: the shapes no erased concept names, or for colours the
    colours not erased."""
    if names and kind_of(names[0]) == "color":
        erased = {c for n in names for c in colors_named(n)}
        return [c for c in shapes.COLORS if c not in erased]
    named = {s for n in names for s in shapes_named(n)}
    return [s for s in shapes.SHAPES if s not in named]

