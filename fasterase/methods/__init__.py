"""The method registry: name -> (one-line summary, config dataclass, run function).

Each method is `run(model: Denoiser, concepts: ConceptSet, cfg, progress) -> Edit` and leaves the
model as it found it; the caller applies the Edit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import ant, esd, uce


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config: type
    run: Callable


REGISTRY = {
    m.name: m
    for m in (
        Method("uce", "UCE: closed-form edit of the text key/value projections (no training)", uce.UCEConfig, uce.run),
        Method("esd", "ESD: LoRA fine-tuning with negative guidance on the model's own trajectory",
               esd.ESDConfig, esd.run),
        Method("ant", "ANT: trajectory-aware loss, training only the concept's saliency map; several concepts: "
               "per-concept LoRAs fused in closed form", ant.ANTConfig, ant.run),
    )
}


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]
