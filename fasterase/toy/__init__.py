"""The built-in toy world: shapes, tiny pipelines, detector.

Importing it (the api does) registers "toy-sd" and "toy-flux" with models.load, with the call
arguments their images need, so the loader knows the world without importing it.
"""
from diffusers import FluxPipeline, StableDiffusionPipeline

from .. import models
from . import components

models.register("toy-sd", components.sd_pipeline, components.SAMPLE_KWARGS["toy-sd"],
                lambda p: isinstance(p, StableDiffusionPipeline) and components.is_toy(p))
models.register("toy-flux", components.flux_pipeline, components.SAMPLE_KWARGS["toy-flux"],
                lambda p: isinstance(p, FluxPipeline) and components.is_toy(p))
