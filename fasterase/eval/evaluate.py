"""Toy-world evaluation: generate with fixed seeds, classify with the detector, score.

Scoring needs a detector of the model's world, and only the toy world has one: a model from
anywhere else is refused before any image is drawn, and can have a grid of samples instead.
"""
from __future__ import annotations

from .. import models
from ..concepts import Concept, split_names
from ..errors import UserError
from ..models import Denoiser
from ..toy import components
from ..toy import concepts as toy_concepts
from ..toy import detector as toy_detector
from ..toy import shapes
from .grid import check_grid_path, save_grid
from .metrics import Item, concept_accuracies, erasure_metrics, scene_metrics

COLUMNS = 8  # grid columns: a shape's plain prompts fill two rows
# Pixels generated in one pipeline call: 256 toy images (32x48), 4 at 512x512, 1 at 1024x1024.
BATCH_PIXELS = 2**20


def _scene_colors(pair_index: int) -> list[tuple[str, str]]:
    """Four (left, right) colour pairs for one ordered pair of shapes; over the 20 pairs every one
    of the 16 colour pairs comes up five times."""
    n = len(shapes.COLORS)
    return [(shapes.COLORS[j], shapes.COLORS[(j + 1 + pair_index) % n]) for j in range(n)]


def _items() -> list[tuple[str, tuple[tuple[str, str], ...], str]]:
    """(prompt, objects named, kind) for every evaluation prompt, in grid order: each shape in each
    colour with the method templates, its synonyms likewise, each shape with the held-out templates,
    and every ordered pair of shapes in four colour pairs with every scene template."""
    items = []
    for s in shapes.SHAPES:
        items += [(shapes.caption(t, (s, c)), ((s, c),), "plain") for c in shapes.COLORS for t in shapes.TEMPLATES]
    for s, words in shapes.SYNONYMS.items():
        items += [(shapes.caption(t, (w, c)), ((s, c),), "synonym")
                  for w in words for c in shapes.COLORS for t in shapes.TEMPLATES]
    for s in shapes.SHAPES:
        items += [(shapes.caption(t, (s, c)), ((s, c),), "heldout")
                  for c in shapes.COLORS for t in shapes.HELDOUT_TEMPLATES]
    pairs = [(a, b) for a in shapes.SHAPES for b in shapes.SHAPES if a != b]
    for k, (a, b) in enumerate(pairs):
        items += [(shapes.caption(t, (a, ca), (b, cb)), ((a, ca), (b, cb)), "scene")
                  for ca, cb in _scene_colors(k) for t in shapes.SCENE_TEMPLATES]
    return items


def _batch_size(model: Denoiser) -> int:
    """Images per pipeline call, fewer the larger the model's images (the VAE's sample size)."""
    side = model.pipeline.vae.config.sample_size
    return max(1, min(256, BATCH_PIXELS // (side * side)))


def erased_concepts(erased: list[str]) -> list[str]:
    """The toy shapes or colours erased concepts name ("red circle" and "disk" name the circle,
    "red" the colour red), each once; all of one kind. No names: none."""
    if not erased:
        return []
    toy_concepts.check_erasable(erased)
    out = []
    for name in erased:
        named = toy_concepts.shapes_named(name) or toy_concepts.colors_named(name)
        out += [s for s in named if s not in out]
    return out


def outside_toy(name: str) -> UserError:
    """Why a model outside the toy world gets no scores (eval says it before loading one)."""
    return UserError(f"scores need a detector of the model's world, and only the toy world (toy-sd, toy-flux and "
                     f"their saved copies) has one; {name} is not of it. A grid of samples needs none: "
                     f"`fasterase eval --grid FILE` without --erased or --repeats")


def evaluate(model, erased=(), seed: int = 0, repeats: int = 2, grid: str | None = None,
             progress: bool = False) -> dict:
    """Score a toy model with the detector (see metrics.py for every key): per shape and colour its
    accuracy on method templates, held-out templates and synonyms; `scenes`; and with `erased`
    (a string or list of concept names, commas separating several, as everywhere; scored by the
    shapes or colours they name) Acc_e, Acc_g, Acc_s, H, Col_s and the
    held-out and scene numbers. Each prompt is sampled `repeats` times, images seeded from `seed`.

    model: a Denoiser, a pipeline or a registered name ("toy-sd"); erased: a name, a Concept, or a
    list of them (None: none); progress: a bar on stderr counting the image batches drawn.

    Raises UserError for a model outside the toy world, repeats < 1, a bad grid path or an erased
    concept that names no toy shape or colour."""
    if not isinstance(model, Denoiser):
        model = models.load(model)
    if not components.is_toy(model.pipeline):
        raise outside_toy(model.name or model.kind)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"repeats (samples per prompt) must be an integer >= 1, got {repeats!r}")
    if grid:
        check_grid_path(grid)  # before any image is drawn
    given = [] if erased is None else [erased] if isinstance(erased, (str, Concept)) else list(erased)
    if not all(isinstance(e, (str, Concept)) for e in given):
        raise UserError(f"erased must be concept names or Concepts (a string, a Concept or a list), got {erased!r}")
    erased = erased_concepts([n for e in given for n in split_names(e.name if isinstance(e, Concept) else e)])
    prompts = _items() * repeats
    images = model.generate([p for p, *_ in prompts], seed=seed, batch_size=_batch_size(model),
                            progress="scoring" if progress else None)
    found = toy_detector.load().classify(images * 2 - 1)
    items = [Item(objects, kind, f) for (_, objects, kind), f in zip(prompts, found)]
    report = {"model": model.name or model.kind, "images": len(items), "seed": seed, "repeats": repeats,
              "concepts": concept_accuracies(items, list(shapes.SHAPES) + list(shapes.COLORS), erased),
              "scenes": {}}
    scenes = scene_metrics(items, erased)  # acc_both, and with erased concepts their scene numbers
    report["scenes"]["acc_both"] = scenes.pop("acc_both")
    if erased:
        report.update(erasure_metrics(report["concepts"], erased))
        report.update(scenes)
    if grid:  # first repeat, in _items' order
        save_grid(images[: len(items) // repeats], grid, columns=COLUMNS)
        report["grid"] = str(grid)
    return report


def grid_prompts(concepts: list[dict], preserve: list[str]) -> list[str]:
    """What an edit's grid draws outside the toy world: each erased concept in its templates, then the
    preserved ones in the first concept's (concepts: Edit.concepts, preserve: the names kept)."""
    erased = tuple(Concept(**c) for c in concepts)
    return [p for c in erased for p in c.prompts()] + [p for name in preserve
                                                       for p in Concept(name, templates=erased[0].templates).prompts()]


def sample_grid(model: Denoiser, path, prompts: list[str], seed: int = 0, columns: int = COLUMNS) -> dict:
    """`prompts` drawn once each with fixed seeds, as a PNG grid of `columns`, for a model of any world:
    no scores. Batches shrink with the image size. The report's sample_steps: None for the pipeline's own."""
    check_grid_path(path)  # before any image is drawn
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise UserError(f"a sample grid needs prompts, each a non-empty text; got {prompts!r}")
    save_grid(model.generate(list(prompts), seed=seed, batch_size=_batch_size(model)), path, columns=columns)
    return {"model": model.name or model.kind, "images": len(prompts), "seed": seed, "grid": str(path),
            "prompts": list(prompts), "resolution": [model.height, model.width],
            "sample_steps": model.sample_kwargs.get("num_inference_steps")}


def format_table(report: dict) -> str:
    """A readable table of one evaluation report."""
    def num(v):
        return "-" if v is None else f"{v:.3f}"

    lines = [f"model {report['model']}  ({report['images']} images, seed {report['seed']})",
             f"{'concept':<10} {'acc':>6} {'held-out':>9} {'synonyms':>9} {'colour':>7}"]
    for name, r in report["concepts"].items():
        mark = " (erased)" if name in report.get("erased", ()) else ""
        lines.append(f"{name:<10} {num(r['acc']):>6} {num(r['acc_heldout']):>9} {num(r['acc_synonyms']):>9} "
                     f"{num(r.get('acc_color')):>7}{mark}")
    lines.append(f"scenes: both shapes {num(report['scenes']['acc_both'])}")
    if "acc_e" in report:
        lines.append(f"Acc_e {num(report['acc_e'])}  held-out {num(report['acc_e_heldout'])}  "
                     f"Acc_g {num(report['acc_g'])}  Acc_s {num(report['acc_s'])}  H {num(report['H'])}  "
                     f"Col_s {num(report['color_s'])}")
        pair = f"  erased pair {num(report['acc_e_pair'])}" if "acc_e_pair" in report else ""
        lines.append(f"scenes with an erased concept: it shows {num(report['acc_e_scene'])}, "
                     f"the other shape {num(report['acc_s_scene'])}{pair}")
    return "\n".join(lines)
