"""Toy-world evaluation: generate with fixed seeds, classify with the detector, score."""
from __future__ import annotations

from ..models import Denoiser
from ..toy import detector as toy_detector
from ..toy import shapes
from .grid import save_grid
from .metrics import erasure_metrics

TEMPLATES = shapes.COLOR_TEMPLATES[:4]


def prompt_set(shape_word: str) -> list[tuple[str, str]]:
    """(prompt, colour) for every colour x the first four colour templates."""
    return [(t.format(color=c, shape=shape_word), c) for c in shapes.COLORS for t in TEMPLATES]


def evaluate(model: Denoiser, erased: list[str] = (), seed: int = 0, repeats: int = 2,
             grid: str | None = None) -> dict:
    """Per-shape accuracy on its prompts, its synonym prompts, and colour accuracy; with
    `erased`, also Acc_e, Acc_g, Acc_s, H and Col_s (colour accuracy of the other shapes: an edit
    can keep their shape and still lose their colour). Each prompt is sampled `repeats` times."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats (samples per prompt) must be an integer >= 1, got {repeats!r}")
    erased = list(erased)
    bad = [e for e in erased if e not in shapes.SHAPES]
    if bad:
        raise ValueError(f"unknown erased concept(s) {bad}; the toy world's concepts are: {', '.join(shapes.SHAPES)}")
    items = []  # (prompt, shape, colour, is_synonym)
    for s in shapes.SHAPES:
        items += [(p, s, c, False) for p, c in prompt_set(s)]
        for w in shapes.SYNONYMS.get(s, ()):
            items += [(p, s, c, True) for p, c in prompt_set(w)]
    items = items * repeats
    images = model.generate([p for p, *_ in items], seed=seed)
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
    if grid:
        # one row per shape (and synonym), first repeat: colour x template
        per_row = len(shapes.COLORS) * len(TEMPLATES)
        save_grid(images[: len(items) // repeats], grid, columns=per_row)
        report["grid"] = str(grid)
    return report


def format_table(report: dict) -> str:
    """A readable table of one evaluation report."""
    lines = [f"model {report['model']}  ({report['images']} images, seed {report['seed']})",
             f"{'concept':<10} {'acc':>6} {'synonyms':>9} {'colour':>7}"]
    for name, r in report["concepts"].items():
        syn = "-" if r["acc_synonyms"] is None else f"{r['acc_synonyms']:.3f}"
        mark = " (erased)" if name in report.get("erased", ()) else ""
        lines.append(f"{name:<10} {r['acc']:>6.3f} {syn:>9} {r['acc_color']:>7.3f}{mark}")
    if "acc_e" in report:
        g = "-" if report["acc_g"] is None else f"{report['acc_g']:.3f}"
        lines.append(f"Acc_e {report['acc_e']:.3f}  Acc_g {g}  Acc_s {report['acc_s']:.3f}  H {report['H']:.3f}  "
                     f"Col_s {report['color_s']:.3f}")
    return "\n".join(lines)
