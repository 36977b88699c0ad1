"""The real models' published configs (fasterase.models.real_configs), built on the meta device."""
import pytest
import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from fasterase import models
from fasterase.errors import UserError
from fasterase.models import real_configs


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Published parameter counts of the checkpoints these configs describe:
# - SD1.5 UNet: diffusers' ModelMixin.num_parameters docstring (stable-diffusion-v1-5 "unet" -> 859520964).
# - FLUX.1-dev transformer: the hub's safetensors total for black-forest-labs/FLUX.1-dev (11.9B).
# - CLIP-L text encoder (SD1.5 text_encoder, FLUX.1 text_encoder): openai/clip-vit-large-patch14's text
#   tower, 123060480, as listed with the SD1.5 UNet and VAE counts in DeepSpeed-MII's README.
# - T5 v1.1 XXL encoder (FLUX.1 text_encoder_2): 4762310656, the hub's safetensors total of that encoder
#   as SD3 and PixArt ship it.
# - SD VAE: 83653863, listed with the two above; FLUX.1 VAE (16 latent channels, no quant convs):
#   83819683 values in 244 tensors of FLUX.1-dev's vae/diffusion_pytorch_model.safetensors.
NETWORKS = {"sd15": 859_520_964, "flux-dev": 11_901_408_320}
PARTS = [
    ("sd15", "vae", lambda c: AutoencoderKL.from_config(c), 83_653_863),
    ("flux-dev", "vae", lambda c: AutoencoderKL.from_config(c), 83_819_683),
    ("sd15", "text_encoder", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)), 123_060_480),
    ("flux-dev", "text_encoder", lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c)), 123_060_480),
    ("flux-dev", "text_encoder_2", lambda c: T5EncoderModel(T5Config.from_dict(c)), 4_762_310_656),
]


@pytest.mark.parametrize("name", real_configs.NAMES)
def test_network_has_the_published_size_on_meta(name):
    with torch.device("meta"):
        net = real_configs.network(name)
    assert type(net).__name__ == models.ADAPTERS[real_configs.model_index(name)["_class_name"]][1]
    assert _count(net) == NETWORKS[name]
    assert all(p.is_meta for p in net.parameters())


@pytest.mark.parametrize("name, component, build, count", PARTS, ids=[f"{p[0]}-{p[1]}" for p in PARTS])
def test_components_have_the_published_size_on_meta(name, component, build, count):
    with torch.device("meta"):
        module = build(real_configs.component_config(name, component))
    assert _count(module) == count


def test_network_overrides_change_depth_not_width():
    with torch.device("meta"):
        slim = real_configs.network("flux-dev", num_layers=2, num_single_layers=1)
    assert (len(slim.transformer_blocks), len(slim.single_transformer_blocks)) == (2, 1)
    assert slim.inner_dim == 3072 and slim.config.joint_attention_dim == 4096


def test_configs_pass_the_loader_checks():
    for name in real_configs.NAMES:
        index = real_configs.model_index(name)
        parts = {c: (index[c][1], real_configs.component_config(name, c)) for c in real_configs.components(name)}
        assert models._refusal(index["_class_name"], parts) is None
    assert real_configs.model_index("sd15")["safety_checker"] == [None, None]


def test_unknown_names_are_refused_with_the_valid_ones():
    with pytest.raises(UserError, match="sd15, flux-dev"):
        real_configs.folder("sdxl")
    with pytest.raises(UserError, match="scheduler, text_encoder, unet, vae"):
        real_configs.component_config("sd15", "tokenizer")
