"""Erasure metrics from what the detector found in each image.

An item is one prompt's image: `objects`, the (shape, colour) pairs its prompt names (one, or two
for a scene: left, then right), its `kind` ("plain": a method template; "heldout": a held-out
template; "synonym": a method template with a shape's synonym; "scene"), and `found`, the
detector's {shape: colour} for the image. A concept is a shape or a colour.

Shown: a shape concept where its shape is found; a colour concept where the named shape is found
in that colour.

Per concept: `acc` (its plain prompts showing it), `acc_heldout`, `acc_synonyms` (shapes with
synonyms; else None: a colour has none), and for shapes `acc_color` (found in the colour named).

With erased concepts (all shapes or all colours):
  Acc_e: erased concepts' acc (lower is better); acc_e_heldout likewise on held-out templates.
  Acc_g: the same on their synonym prompts (generality; lower is better; None without synonyms).
  Acc_s: the kept concepts' acc (specificity; higher is better). For erased shapes: the other
    shapes; for erased colours: every shape and the other colours.
  H: harmonic mean of (1 - Acc_e), (1 - Acc_g) and Acc_s, of those that are defined.
  Col_s (shapes erased): the other shapes' colour accuracy (not in H): an edit can keep a shape
    and still lose its colour.
Scenes: acc_both (scenes naming no erased concept: both shapes found); with erased concepts,
acc_e_scene (scenes with exactly one object carrying an erased concept: that object shows it),
acc_s_scene (the same images: the other object's shape found), and with two or more erased
concepts acc_e_pair (scenes where both objects carry an erased concept: either shows one). With
one erased colour, a scene whose two objects both carry it counts in none of these.
"""
from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

from ..toy import shapes


@dataclass(frozen=True)
class Item:
    objects: tuple[tuple[str, str], ...]
    kind: str
    found: dict[str, str]


def harmonic_mean(values: list[float]) -> float:
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs values >= 0, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def _is_color(concept: str) -> bool:
    return concept in shapes.COLORS


def carries(obj: tuple[str, str], concept: str) -> bool:
    """Whether a named object is of the concept (its shape, or its colour)."""
    return obj[1] == concept if _is_color(concept) else obj[0] == concept


def shows(obj: tuple[str, str], concept: str, found: dict[str, str]) -> bool:
    """Whether an image shows the concept on this object: its shape found, or (a colour) its
    shape found in that colour."""
    return found.get(obj[0]) == concept if _is_color(concept) else obj[0] in found


def _share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def concept_accuracies(items: list[Item], concepts: list[str], erased: list[str] = ()) -> dict[str, dict]:
    """Per concept (shape or colour name), its accuracies over the single-object items naming it.
    A colour is scored on the shapes that are not erased: an erased circle is not a lost red."""
    out = {}
    for c in concepts:
        def share(kind, test):
            return _share([test(it) for it in items if it.kind == kind and carries(it.objects[0], c)
                           and not (_is_color(c) and it.objects[0][0] in erased)])

        out[c] = {
            "acc": share("plain", lambda it: shows(it.objects[0], c, it.found)),
            "acc_heldout": share("heldout", lambda it: shows(it.objects[0], c, it.found)),
            "acc_synonyms": None,
        }
        if not _is_color(c):  # a colour has no synonyms of its own; a shape's are held out from methods
            out[c]["acc_synonyms"] = share("synonym", lambda it: shows(it.objects[0], c, it.found))
            out[c]["acc_color"] = share("plain", lambda it: it.found.get(c) == it.objects[0][1])
    return out


def scene_metrics(items: list[Item], erased: list[str] = ()) -> dict:
    """acc_both, and with erased concepts acc_e_scene, acc_s_scene and (two or more) acc_e_pair."""
    scenes = [it for it in items if it.kind == "scene"]
    n_erased = [sum(any(carries(o, e) for e in erased) for o in it.objects) for it in scenes]
    out = {"acc_both": _share([all(o[0] in it.found for o in it.objects)
                               for it, n in zip(scenes, n_erased) if n == 0])}
    if erased:
        one = [it for it, n in zip(scenes, n_erased) if n == 1]
        hit = [[any(carries(o, e) for e in erased) for o in it.objects].index(True) for it in one]
        out["acc_e_scene"] = _share([any(shows(it.objects[h], e, it.found) for e in erased
                                         if carries(it.objects[h], e)) for it, h in zip(one, hit)])
        out["acc_s_scene"] = _share([it.objects[1 - h][0] in it.found for it, h in zip(one, hit)])
        if len(erased) > 1:
            both = [it for it, n in zip(scenes, n_erased) if n == 2]
            out["acc_e_pair"] = _share([any(shows(o, e, it.found) for o in it.objects for e in erased
                                             if carries(o, e)) for it in both])
    return out


def erasure_metrics(per_concept: dict[str, dict], erased: list[str]) -> dict:
    """Acc_e, Acc_g, Acc_s, H, Col_s and acc_e_heldout from concept_accuracies' output."""
    unknown = [e for e in erased if e not in per_concept]
    if unknown:
        raise ValueError(f"erased concept(s) {unknown} not evaluated; valid: {sorted(per_concept)}")
    if not erased:
        raise ValueError("erasure metrics need at least one erased concept")
    colors = [_is_color(e) for e in erased]
    if any(colors) and not all(colors):
        raise ValueError(f"erased concepts {erased} mix shapes and colours; score one kind at a time")
    if all(colors):  # a colour erased: every shape must stay, and the other colours
        kept = [c for c in per_concept if c not in erased]
    else:
        kept = [c for c in per_concept if c not in erased and not _is_color(c)]
    acc_e = mean(per_concept[c]["acc"] for c in erased)
    syn = [per_concept[c]["acc_synonyms"] for c in erased if per_concept[c]["acc_synonyms"] is not None]
    acc_g = mean(syn) if syn else None
    acc_s = mean(per_concept[c]["acc"] for c in kept) if kept else None
    terms = [t for t in (1 - acc_e, acc_s, None if acc_g is None else 1 - acc_g) if t is not None]
    kept_shapes = [c for c in kept if not _is_color(c)]
    color_s = mean(per_concept[c]["acc_color"] for c in kept_shapes) if kept_shapes and not all(colors) else None
    return {"erased": list(erased), "acc_e": acc_e, "acc_e_heldout": mean(per_concept[c]["acc_heldout"] for c in erased),
            "acc_g": acc_g, "acc_s": acc_s, "H": harmonic_mean(terms), "color_s": color_s}
