"""A model on the meta device: its networks built from their configs, with shapes and no weights.

What the memory planner (fasterase/plan.py) measures: `describe(model)` reads a registered name
(the toy world's), a real model's published configs (real_configs.NAMES) or a local diffusers
folder, refusing what no adapter handles as load() does, and loads no weights but a registered
name's (the toy pipelines are built whole, 8.6 MB). `MetaModel.denoiser(dtype, height, width)`
then gives the model's own adapter (UNetDenoiser or FluxDenoiser) over a fresh network on the meta
device, so predict() and guided() run the very calls the methods make, at any batch and resolution,
allocating nothing. Its encode() returns meta embeddings of the text encoders' output shapes.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import diffusers
import torch
import transformers
from diffusers.configuration_utils import FrozenDict
from torch import nn

from . import ADAPTERS, BUILTINS, Denoiser, _check, _folder_parts, folder_dtype, not_a_model, real_configs

# FluxPipeline's default max_sequence_length: the T5 rows of a prompt when the folder holds no tokenizer.
FLUX_TOKENS = 512


def entry_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a module's parameters and buffers once cast to `dtype` (what Module.to(dtype) casts:
    floating-point tensors; the others keep their size)."""
    size = torch.finfo(dtype).bits // 8
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)


def _module(cls_name: str, config: dict) -> nn.Module:
    """A diffusers or transformers module of that class from its config, on the current default device."""
    if hasattr(diffusers, cls_name):
        return getattr(diffusers, cls_name).from_config(config)
    cls = getattr(transformers, cls_name)
    return cls(cls.config_class.from_dict(config))


@dataclass
class MetaModel:
    """What the planner reads of a model: its network's class and config (built afresh on meta each time),
    the scheduler, the VAE's config, a prompt's token rows, the VAE and text encoders to count."""

    pipeline_class: str  # a key of ADAPTERS
    network_class: type
    network_config: dict
    scheduler: object
    vae_config: dict
    tokens: int  # token rows of a prompt's embedding (SD: CLIP's 77; FLUX: T5's max_sequence_length)
    others: dict[str, nn.Module]  # the VAE and the text encoders by component name (on meta, or a toy's own)
    size: tuple[int, int] | None  # (height, width) px a registered name samples at; None: the adapter's default
    dtype: torch.dtype | None  # what load() loads it in by default; None: a real model's configs, shipped without weights

    @property
    def network_name(self) -> str:
        return ADAPTERS[self.pipeline_class][0]

    @property
    def kind(self) -> str:
        return ADAPTERS[self.pipeline_class][2].kind

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel, as the pipelines compute it from the VAE's config."""
        return 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    def network(self) -> nn.Module:
        """A fresh denoising network on the meta device, in float32 (the class's init)."""
        with torch.device("meta"):
            return self.network_class.from_config(self.network_config)

    def denoiser(self, dtype: torch.dtype, height: int | None = None, width: int | None = None) -> Denoiser:
        """The model's adapter over a fresh meta network cast to `dtype`, at height x width px (else the
        size the model samples at by default)."""
        # torch's cast: diffusers' ModelMixin.to warns about casting without from_pretrained's torch_dtype
        den = ADAPTERS[self.pipeline_class][2](_Parts(self, nn.Module.to(self.network(), dtype)))
        size = (height, width) if height else self.size
        if size:
            den.set_size(*size)
        return den


class _Parts:
    """What the adapters (models/unet.py, models/flux.py) read of a pipeline: the network, the scheduler,
    the VAE's config and scale factor, the T5 tokenizer's length, and encode_prompt, which here gives
    meta embeddings of the text encoders' output shapes (SD: tokens x cross_attention_dim; FLUX: tokens
    x joint_attention_dim, and the pooled pooled_projection_dim)."""

    def __init__(self, model: MetaModel, network: nn.Module):
        setattr(self, model.network_name, network)
        self.network, self.kind, self.tokens = network, model.kind, model.tokens
        self.scheduler = model.scheduler
        self.vae = SimpleNamespace(config=FrozenDict(model.vae_config))
        self.vae_scale_factor = model.vae_scale_factor
        self.tokenizer_2 = SimpleNamespace(model_max_length=model.tokens)

    def encode_prompt(self, prompts, *args, **kwargs):
        n, cfg = len(prompts), self.network.config
        if self.kind == "sd":
            return torch.empty(n, self.tokens, cfg.cross_attention_dim, device="meta"), None
        embeds = torch.empty(n, self.tokens, cfg.joint_attention_dim, device="meta")
        return embeds, torch.empty(n, cfg.pooled_projection_dim, device="meta"), None


def describe(model: str, dtype: torch.dtype | None = None) -> MetaModel:
    """The MetaModel of a registered name, a local diffusers folder or a real model's name (real_configs.NAMES;
    a local folder of that name comes first, as erase loads it) (without `dtype`, its weight files' headers are read for theirs, no weights loaded); anything
    else, a pipeline no adapter handles, or a folder without its network's weights when no dtype is given
    is a UserError."""
    if model in BUILTINS:
        return _builtin(model)
    path = Path(model).expanduser()
    named = model in real_configs.NAMES and not (path / "model_index.json").is_file()
    if named:  # a local folder of that name is what erase would load, so it is what is planned
        path = real_configs.folder(model)
    if not (path / "model_index.json").is_file():
        raise not_a_model(model, path, f"a built-in name, nor one of {', '.join(real_configs.NAMES)},")
    cls, parts = _folder_parts(path)
    _check(cls, parts)
    network_name = ADAPTERS[cls][0]
    with torch.device("meta"):
        others = {name: _module(c, config) for name, (c, config) in parts.items()
                  if name == "vae" or name.startswith("text_encoder")}
    if network_name == "unet":  # CLIP pads every prompt to its tokenizer's length, its max_position_embeddings
        tokens = parts["text_encoder"][1]["max_position_embeddings"]
    else:  # FluxDenoiser: T5 rows up to min(512, the tokenizer's model_max_length)
        saved = path / "tokenizer_2" / "tokenizer_config.json"
        length = json.loads(saved.read_text()).get("model_max_length", FLUX_TOKENS) if saved.is_file() else FLUX_TOKENS
        tokens = min(FLUX_TOKENS, length)
    net_cls, net_config = parts[network_name]
    sched_cls, sched_config = parts["scheduler"]
    if dtype is None and not named:
        dtype = folder_dtype(path, network_name)
    return MetaModel(cls, getattr(diffusers, net_cls), net_config,
                     getattr(diffusers, sched_cls).from_config(sched_config), parts["vae"][1], tokens, others, None,
                     dtype)


def _builtin(name: str) -> MetaModel:
    """A registered pipeline, built whole (the toy world's are small), at the size it samples at."""
    pipe = BUILTINS[name].build()
    cls = type(pipe).__name__
    net = getattr(pipe, ADAPTERS[cls][0])
    others = {n: m for n, m in pipe.components.items() if n == "vae" or n.startswith("text_encoder")}
    tokens = pipe.tokenizer.model_max_length if cls == "StableDiffusionPipeline" else min(
        FLUX_TOKENS, pipe.tokenizer_2.model_max_length)
    kwargs = BUILTINS[name].sample_kwargs
    size = (kwargs["height"], kwargs["width"]) if "height" in kwargs else None
    return MetaModel(cls, type(net), dict(net.config), pipe.scheduler, dict(pipe.vae.config), tokens,
                     others, size, net.dtype)
