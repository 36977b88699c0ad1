"""Erasure metrics from per-concept detector accuracies.

Acc_e: erased concepts' own prompts still showing the concept (lower is better).
Acc_g: the same on their synonym prompts (generality; lower is better).
Acc_s: the other concepts' prompts still showing their concept (specificity; higher is better).
H: harmonic mean of (1 - Acc_e), (1 - Acc_g) and Acc_s; when no erased concept has synonyms,
Acc_g is undefined (None), and when every concept is erased so are Acc_s and Col_s: H is the
harmonic mean of the terms that are defined.
Col_s: the other concepts' colour accuracy (not part of H): an edit can keep a shape and still
lose its colour.
"""
from __future__ import annotations

from statistics import mean


def harmonic_mean(values: list[float]) -> float:
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 for v in values):
        raise ValueError(f"harmonic mean needs values >= 0, got {values}")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def erasure_metrics(per_concept: dict[str, dict], erased: list[str]) -> dict:
    """per_concept[name] has 'acc', 'acc_synonyms' (None when it has no synonyms) and 'acc_color'."""
    unknown = [e for e in erased if e not in per_concept]
    if unknown:
        raise ValueError(f"erased concept(s) {unknown} not evaluated; valid: {sorted(per_concept)}")
    if not erased:
        raise ValueError("erasure metrics need at least one erased concept")
    kept = [c for c in per_concept if c not in erased]
    acc_e = mean(per_concept[c]["acc"] for c in erased)
    syn = [per_concept[c]["acc_synonyms"] for c in erased if per_concept[c]["acc_synonyms"] is not None]
    acc_g = mean(syn) if syn else None
    acc_s = mean(per_concept[c]["acc"] for c in kept) if kept else None
    terms = [t for t in (1 - acc_e, acc_s, None if acc_g is None else 1 - acc_g) if t is not None]
    color_s = mean(per_concept[c]["acc_color"] for c in kept) if kept else None
    return {"erased": list(erased), "acc_e": acc_e, "acc_g": acc_g, "acc_s": acc_s, "H": harmonic_mean(terms),
            "color_s": color_s}
