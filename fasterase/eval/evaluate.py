"""Toy-world evaluation: generate with fixed seeds, classify with the detector, score.

Scoring needs a detector of the model's world, and only the toy world has one: a model from
anywhere else is refused before any image is drawn, and can have a grid of samples instead.
"""
from __future__ import annotations

from ..errors import UserError
from ..models import Denoiser
from ..toy import components
from ..toy import detector as toy_detector
from ..toy import shapes
from ..toy.concepts import shapes_named
from .grid import check_grid_path, save_grid
from .metrics import erasure_metrics

TEMPLATES = shapes.COLOR_TEMPLATES[:4]
ROW = len(shapes.COLORS) * len(TEMPLATES)  # grid columns: one row per shape or synonym
# Pixels generated in one pipeline call: 256 toy images (32x32), 4 at 512x512, 1 at 1024x1024.
BATCH_PIXELS = 2**20


def prompt_set(shape_word: str) -> list[tuple[str, str]]:
    """(prompt, colour) for every colour x the first four colour templates."""
    return [(t.format(color=c, shape=shape_word), c) for c in shapes.COLORS for t in TEMPLATES]


def _items() -> list[tuple[str, str, str, bool]]:
    """(prompt, shape, colour, is_synonym) for every shape and synonym: one sample each."""
    items = []
    for s in shapes.SHAPES:
        items += [(p, s, c, False) for p, c in prompt_set(s)]
        for w in shapes.SYNONYMS.get(s, ()):
            items += [(p, s, c, True) for p, c in prompt_set(w)]
    return items


def _batch_size(model: Denoiser) -> int:
    """Images per pipeline call, fewer the larger the model's images (the VAE's sample size)."""
    side = model.pipeline.vae.config.sample_size
    return max(1, min(256, BATCH_PIXELS // (side * side)))


def erased_shapes(erased: list[str]) -> list[str]:
    """The toy shapes erased concepts name ("red circle" and "disk" name the circle), each once."""
    out = []
    for name in erased:
        named = shapes_named(name)
        if not named:
            raise UserError(f"erased concept {name!r} names no toy shape, and the detector scores shapes: "
                            f"name one of {', '.join(shapes.SHAPES)} (or a synonym: "
                            f"{', '.join(w for ws in shapes.SYNONYMS.values() for w in ws)})")
        out += [s for s in named if s not in out]
    return out


def outside_toy(name: str) -> UserError:
    """Why a model outside the toy world gets no scores (eval says it before loading one)."""
    return UserError(f"scores need a detector of the model's world, and only the toy world (toy-sd, toy-flux and "
                     f"their saved copies) has one; {name} is not of it. A grid of samples needs none: "
                     f"`fasterase eval --grid FILE` without --erased or --repeats")


def evaluate(model: Denoiser, erased: list[str] = (), seed: int = 0, repeats: int = 2,
             grid: str | None = None) -> dict:
    """Per-shape accuracy on its prompts, its synonym prompts, and colour accuracy; with
    `erased` (concepts, scored by the toy shapes they name), also Acc_e, Acc_g, Acc_s, H and Col_s
    (colour accuracy of the other shapes: an edit can keep their shape and still lose their colour).
    Each prompt is sampled `repeats` times."""
    if not components.is_toy(model.pipeline):
        raise outside_toy(model.name or model.kind)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UserError(f"repeats (samples per prompt) must be an integer >= 1, got {repeats!r}")
    if grid:
        check_grid_path(grid)  # before any image is drawn
    erased = erased_shapes(list(erased))
    items = _items() * repeats
    images = model.generate([p for p, *_ in items], seed=seed, batch_size=_batch_size(model))
    det = toy_detector.load()
    pred_shape, pred_color = det.classify(images * 2 - 1)
    per = {}
    for s in shapes.SHAPES:
        plain = [i for i, it in enumerate(items) if it[1] == s and not it[3]]
        syn = [i for i, it in enumerate(items) if it[1] == s and it[3]]
        per[s] = {
            "acc": sum(pred_shape[i] == s for i in plain) / len(plain),
            "acc_synonyms": sum(pred_shape[i] == s for i in syn) / len(syn) if syn else None,
            "acc_color": sum(pred_color[i] == items[i][2] for i in plain) / len(plain),
        }
    report = {"model": model.name or model.kind, "images": len(items), "seed": seed, "repeats": repeats,
              "concepts": per}
    if erased:
        report.update(erasure_metrics(per, erased))
    if grid:  # first repeat: colour x template
        save_grid(images[: len(items) // repeats], grid, columns=ROW)
        report["grid"] = str(grid)
    return report


def sample_grid(model: Denoiser, path, seed: int = 0) -> dict:
    """Every evaluation prompt once, as a PNG grid (one row per shape or synonym), for a model of
    any world: no scores. Batches shrink with the image size."""
    check_grid_path(path)  # before any image is drawn
    prompts = [p for p, *_ in _items()]
    save_grid(model.generate(prompts, seed=seed, batch_size=_batch_size(model)), path, columns=ROW)
    return {"model": model.name or model.kind, "images": len(prompts), "seed": seed, "grid": str(path)}


def format_table(report: dict) -> str:
    """A readable table of one evaluation report."""
    lines = [f"model {report['model']}  ({report['images']} images, seed {report['seed']})",
             f"{'concept':<10} {'acc':>6} {'synonyms':>9} {'colour':>7}"]
    for name, r in report["concepts"].items():
        syn = "-" if r["acc_synonyms"] is None else f"{r['acc_synonyms']:.3f}"
        mark = " (erased)" if name in report.get("erased", ()) else ""
        lines.append(f"{name:<10} {r['acc']:>6.3f} {syn:>9} {r['acc_color']:>7.3f}{mark}")
    if "acc_e" in report:
        g, s, c = ("-" if report[k] is None else f"{report[k]:.3f}" for k in ("acc_g", "acc_s", "color_s"))
        lines.append(f"Acc_e {report['acc_e']:.3f}  Acc_g {g}  Acc_s {s}  H {report['H']:.3f}  Col_s {c}")
    return "\n".join(lines)
