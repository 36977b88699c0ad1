"""The published configs of the real models fasterase is sized for, shipped without weights.

Users bring Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5, an 860M-parameter UNet) and
FLUX.1-dev (black-forest-labs/FLUX.1-dev, a 12B-parameter transformer) as local diffusers
folders. Their configs live here, in configs/<name>/, laid out as those folders are (a
model_index.json and each component's config.json or scheduler_config.json), so the memory
planner, the tests and scripts/make_real_size.py can build the real architectures with no model
hub: on the meta device to count and plan at no memory cost, or random-initialised to measure
memory and speed. Random weights cannot be scored for erasure.

The values are the published ones, except that sd15's model_index.json names no safety checker
and no feature extractor ([null, null], with requires_safety_checker false, as diffusers saves a
pipeline built without them): fasterase never runs them. Weights and tokenizer vocabularies are
not shipped.
"""
from __future__ import annotations

import json
from pathlib import Path

import diffusers
from torch import nn

from ..errors import UserError
from . import ADAPTERS

NAMES = ("sd15", "flux-dev")
CONFIGS = Path(__file__).parent / "configs"


def folder(name: str) -> Path:
    """The config folder of `name` (one of NAMES); another name is a UserError."""
    if name not in NAMES:
        raise UserError(f"unknown real model {name!r}; valid: {', '.join(NAMES)}")
    return CONFIGS / name


def model_index(name: str) -> dict:
    """The pipeline's model_index.json: its class and, per component, [library, class]."""
    return json.loads((folder(name) / "model_index.json").read_text())


def components(name: str) -> tuple[str, ...]:
    """The components of `name` that have a config here (tokenizers have none)."""
    return tuple(sorted(p.parent.name for p in folder(name).glob("*/*config.json")))


def component_config(name: str, component: str) -> dict:
    """The published config of one component ("unet", "vae", "text_encoder", "scheduler", ...);
    a component without one is a UserError naming those with one."""
    path = folder(name) / component
    files = sorted(path.glob("*config.json")) if component in components(name) else []
    if not files:
        raise UserError(f"{name} has no config for component {component!r}; valid: {', '.join(components(name))}")
    return json.loads(files[0].read_text())


def network_component(name: str) -> str:
    """The component holding the denoising network: "unet" (sd15) or "transformer" (flux-dev)."""
    return ADAPTERS[model_index(name)["_class_name"]][0]


def network(name: str, **overrides) -> nn.Module:
    """The denoising network of `name` (UNet2DConditionModel or FluxTransformer2DModel) from its
    published config, with `overrides` replacing config values (e.g. num_layers=2), built in
    float32 on torch's current default device: ``with torch.device("meta"): network("flux-dev")``
    gives the 12B transformer without allocating it. Weights are the class's random init."""
    config = component_config(name, network_component(name))
    cls = getattr(diffusers, config["_class_name"])
    return cls.from_config(config, **overrides)
