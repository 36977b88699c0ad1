"""The toy pipelines' parts: real diffusers/transformers classes at toy sizes.

One place holds every architecture choice, so the training script and the loader build the
same modules. Weights ship as fp16 safetensors in weights/ (the VAE once, shared by both).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from . import shapes

WEIGHTS = Path(__file__).parent / "weights"
MAX_TOKENS = 16  # longest caption is 12 tokens with <s> and </s>
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
# Inference settings the toy pipelines were trained for (FLUX.1 likewise needs its own).
SAMPLE_KWARGS = {
    "toy-sd": {"height": shapes.HEIGHT, "width": shapes.WIDTH, "num_inference_steps": 20, "guidance_scale": 3.0},
    "toy-flux": {"height": shapes.HEIGHT, "width": shapes.WIDTH, "num_inference_steps": 20, "true_cfg_scale": 3.0,
                 "negative_prompt": "", "max_sequence_length": MAX_TOKENS},
}


def tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the toy vocabulary; unknown words map to <unk>."""
    vocab = {w: i for i, w in enumerate([PAD, UNK, BOS, EOS] + shapes.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=MAX_TOKENS,
        pad_token=PAD, unk_token=UNK, bos_token=BOS, eos_token=EOS,
    )


def _vocab_size() -> int:
    return 4 + len(shapes.vocabulary())


def clip_text_encoder() -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, projection_dim=64,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    ))


def t5_text_encoder() -> T5EncoderModel:
    """A T5 encoder with no blocks: a normalised word embedding, the same for every position,
    so padding adds identical tokens; FLUX's joint attention does the mixing."""
    return T5EncoderModel(T5Config(
        vocab_size=_vocab_size(), d_model=64, d_kv=16, d_ff=128, num_layers=0, num_heads=4,
        pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
    ))


def vae(scaling_factor: float = 1.0) -> AutoencoderKL:
    """32x48 RGB <-> 8x12x4 latents (scale factor 4). sample_size (the wider side) marks the toy VAE."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=shapes.WIDTH,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=16,
        mid_block_add_attention=False, scaling_factor=scaling_factor, shift_factor=0.0,
    )


def unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    )


def flux_transformer() -> FluxTransformer2DModel:
    """2 joint + 2 single blocks, width 128, on 2x2 latent patches (4x6 tokens)."""
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64,
        guidance_embeds=False, axes_dims_rope=(8, 12, 12),
    )


def sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def save_weights(module: torch.nn.Module, name: str, directory: Path = WEIGHTS, metadata=None) -> None:
    """fp16 safetensors, written to a temporary file and renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
    tmp = directory / f".{name}.safetensors.tmp"
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(directory / f"{name}.safetensors")


def load_weights(module: torch.nn.Module, name: str, directory: Path = WEIGHTS) -> torch.nn.Module:
    path = directory / f"{name}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"toy weights {path} are missing; run scripts/train_toy.py to make them")
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


def trained_vae(directory: Path = WEIGHTS) -> AutoencoderKL:
    with safe_open(str(directory / "vae.safetensors"), "pt") as f:
        scale = float(f.metadata()["scaling_factor"])
    return load_weights(vae(scale), "vae", directory)


def sd_pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=trained_vae(), text_encoder=load_weights(clip_text_encoder(), "sd_text_encoder"),
        tokenizer=tokenizer(), unet=load_weights(unet(), "sd_unet"), scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def flux_pipeline() -> FluxPipeline:
    return FluxPipeline(
        scheduler=flux_scheduler(), vae=trained_vae(),
        text_encoder=load_weights(clip_text_encoder(), "flux_text_encoder"), tokenizer=tokenizer(),
        text_encoder_2=load_weights(t5_text_encoder(), "flux_text_encoder_2"), tokenizer_2=tokenizer(),
        transformer=load_weights(flux_transformer(), "flux_transformer"),
    )


def is_toy_source(name: str) -> bool:
    """is_toy before any weights load: a toy pipeline's name, or a folder whose VAE config and
    tokenizer file are the toy world's (what eval decides by before loading a model)."""
    if name in SAMPLE_KWARGS:
        return True
    path = Path(name).expanduser()
    vae, tok = path / "vae" / "config.json", path / "tokenizer" / "tokenizer.json"
    try:
        if json.loads(vae.read_text()).get("sample_size") != shapes.WIDTH:
            return False
        saved = json.loads(tok.read_text())  # len(tokenizer): its vocabulary and added tokens, by id
        ids = set(saved["model"]["vocab"].values()) | {t["id"] for t in saved.get("added_tokens", [])}
        return len(ids) == _vocab_size()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # no such files, or not these configs
        return False


def is_toy(pipeline) -> bool:
    """True for the toy pipelines (and their saved copies): the toy VAE and the toy vocabulary."""
    tok = getattr(pipeline, "tokenizer", None)
    return pipeline.vae.config.sample_size == shapes.WIDTH and tok is not None and len(tok) == _vocab_size()
