"""Model adapters: the only place that knows model internals.

`load(model)` accepts a diffusers pipeline, a local diffusers folder, or the built-in names
"toy-sd" / "toy-flux", and returns the Denoiser for it.
"""
from __future__ import annotations

from pathlib import Path

from .base import Cond, Denoiser, KVProjection
from .flux import FluxDenoiser
from .unet import UNetDenoiser

TOY_NAMES = ("toy-sd", "toy-flux")
ACCEPTED = ("a diffusers StableDiffusionPipeline or FluxPipeline (or any pipeline with a "
            "UNet2DConditionModel or FluxTransformer2DModel), a local diffusers folder, "
            "or one of " + ", ".join(TOY_NAMES))

__all__ = ["Cond", "Denoiser", "KVProjection", "FluxDenoiser", "UNetDenoiser", "load", "TOY_NAMES"]


def _wrap(pipeline) -> Denoiser:
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if isinstance(getattr(pipeline, "transformer", None), FluxTransformer2DModel):
        return FluxDenoiser(pipeline)
    if isinstance(getattr(pipeline, "unet", None), UNet2DConditionModel) and hasattr(pipeline, "encode_prompt"):
        return UNetDenoiser(pipeline)
    raise TypeError(f"unsupported pipeline {type(pipeline).__name__}; accepted: {ACCEPTED}")


def load(model) -> Denoiser:
    """The Denoiser for `model` (see module docstring); anything else is a clear error."""
    if isinstance(model, Denoiser):
        return model
    denoiser = _load(model)
    denoiser.name = str(model) if isinstance(model, (str, Path)) else type(denoiser.pipeline).__name__
    return denoiser


def _load(model) -> Denoiser:
    if isinstance(model, (str, Path)):
        name = str(model)
        if name in TOY_NAMES:
            from ..toy import components

            return _wrap(components.sd_pipeline() if name == "toy-sd" else components.flux_pipeline())
        path = Path(name).expanduser()
        if not (path / "model_index.json").is_file():
            raise ValueError(f"model {name!r} is neither a built-in name nor a local diffusers folder "
                             f"(no model_index.json there); accepted: {ACCEPTED}")
        from diffusers import DiffusionPipeline

        return _wrap(DiffusionPipeline.from_pretrained(str(path)))
    if hasattr(model, "components") and hasattr(model, "scheduler"):
        return _wrap(model)
    raise TypeError(f"model of type {type(model).__name__} is not accepted; accepted: {ACCEPTED}")
