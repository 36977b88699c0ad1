"""The method registry: name -> (one-line summary, config dataclass, run function, idle options, runs images).

Each method is `run(model: Denoiser, concepts: ConceptSet, cfg, progress) -> Edit` and leaves the
model as it found it; the caller applies the Edit. `idle_options(cfg, given, model, concepts)`
names the options the user set that cannot act on that run (an error, before any work).
`runs_images(cfg)`: whether the run puts images through the network, so that a resolution acts on it
(UCE and TRACE with finetune=False read only the encoded prompts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from . import ant, esd, fade, trace, uce


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    config: type
    run: Callable
    idle_options: Callable
    runs_images: Callable = lambda cfg: True


REGISTRY = {
    m.name: m
    for m in (
        Method("uce", "UCE: closed-form edit of the text key/value projections (no training)", uce.UCEConfig, uce.run,
               uce.idle_options, lambda cfg: cfg.text_kv),  # text_kv (FLUX only) reads add_k / add_v in forwards
        Method("esd", "ESD: LoRA fine-tuning with negative guidance on the model's own trajectory",
               esd.ESDConfig, esd.run, esd.idle_options),
        Method("ant", "ANT: trajectory-aware loss, training only the concept's saliency map; several concepts: "
               "per-concept LoRAs fused in closed form", ant.ANTConfig, ant.run, ant.idle_options),
        Method("fade", "FADE: adversarial erasure against a discriminator trained on the model's own generations, "
               "early-step preservation, salient entries only", fade.FADEConfig, fade.run, fade.idle_options),
        Method("trace", "TRACE: closed-form refinement of the text projections, then one LoRA per concept trained "
               "toward the original's trajectory switched to a neutral prompt at t0", trace.TRACEConfig, trace.run,
               trace.idle_options, lambda cfg: cfg.finetune),
    )
}


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]
