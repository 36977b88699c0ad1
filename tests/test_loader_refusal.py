"""The loader refuses what no adapter handles (SDXL, inpainting, img2img, FLUX Fill / Kontext)
before any work, naming what is supported; built from tiny random-initialised diffusers parts."""
import re
import shutil

import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxFillPipeline,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)

from fasterase import models
from fasterase.errors import UserError
from fasterase.toy import components as C

SUPPORTED = "supported: Stable Diffusion 1.x / 2.x text-to-image"


def unet(**overrides):
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               block_out_channels=(16, 32), cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8)
    return UNet2DConditionModel(**{**cfg, **overrides})


def sd(cls=StableDiffusionPipeline, **parts):
    kwargs = dict(vae=C.vae(), text_encoder=C.clip_text_encoder(), tokenizer=C.tokenizer(), unet=unet(),
                  scheduler=C.sd_scheduler(), safety_checker=None, feature_extractor=None,
                  requires_safety_checker=False)
    return cls(**{**kwargs, **parts})


def transformer(**overrides):
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
               num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=(2, 2, 4))
    return FluxTransformer2DModel(**{**cfg, **overrides})


def flux(cls=FluxPipeline, **parts):
    kwargs = dict(scheduler=C.flux_scheduler(), vae=C.vae(), text_encoder=C.clip_text_encoder(),
                  tokenizer=C.tokenizer(), text_encoder_2=C.t5_text_encoder(), tokenizer_2=C.tokenizer(),
                  transformer=transformer())
    return cls(**{**kwargs, **parts})


def sdxl_unet():
    # addition_embed_type "text_time": SDXL's size/crop and pooled-text conditioning
    return unet(addition_embed_type="text_time", addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=6 * 8 + 64)


def sdxl():
    return StableDiffusionXLPipeline(vae=C.vae(), text_encoder=C.clip_text_encoder(),
                                     text_encoder_2=C.clip_text_encoder(), tokenizer=C.tokenizer(),
                                     tokenizer_2=C.tokenizer(), unet=sdxl_unet(), scheduler=C.sd_scheduler())


CASES = {
    "sdxl pipeline": (sdxl, "StableDiffusionXLPipeline"),
    "sdxl unet": (lambda: sd(unet=sdxl_unet()), "addition_embed_type='text_time'"),
    "inpainting pipeline": (lambda: sd(StableDiffusionInpaintPipeline, unet=unet(in_channels=9)),
                            "StableDiffusionInpaintPipeline"),
    "inpainting unet": (lambda: sd(unet=unet(in_channels=9)), "9 input channels"),
    "img2img pipeline": (lambda: sd(StableDiffusionImg2ImgPipeline), "StableDiffusionImg2ImgPipeline"),
    "sd with a flow scheduler": (lambda: sd(scheduler=FlowMatchEulerDiscreteScheduler()), "no beta schedule"),
    "sd sample prediction": (lambda: sd(scheduler=C.sd_scheduler().from_config(C.sd_scheduler().config,
                                                                                prediction_type="sample")),
                             "prediction_type 'sample'"),
    "flux fill transformer": (lambda: flux(transformer=transformer(in_channels=48, out_channels=16)),
                              "48 input channels"),
    "flux fill pipeline": (lambda: flux(FluxFillPipeline), "FluxFillPipeline"),
    "flux kontext pipeline": (lambda: flux(FluxKontextPipeline, image_encoder=None, feature_extractor=None),
                              "FluxKontextPipeline"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_unsupported_pipeline_is_refused(case):
    build, reason = CASES[case]
    with pytest.raises(UserError, match="unsupported pipeline") as err:
        models.load(build())
    assert reason in str(err.value) and SUPPORTED in str(err.value) and "FLUX.1 text-to-image" in str(err.value)


@pytest.mark.parametrize("case", ["sdxl pipeline", "inpainting unet", "flux fill transformer"])
def test_unsupported_folder_is_refused_before_loading(case, tmp_path, monkeypatch):
    build, reason = CASES[case]
    build().save_pretrained(tmp_path)

    def no_loading(*args, **kwargs):
        raise AssertionError("weights loaded before the refusal")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", no_loading)
    with pytest.raises(UserError, match="unsupported pipeline") as err:
        models.load(tmp_path)
    assert reason in str(err.value) and SUPPORTED in str(err.value)


def test_supported_tiny_pipelines_load():
    assert isinstance(models.load(sd()), models.UNetDenoiser)
    v = sd(scheduler=C.sd_scheduler().from_config(C.sd_scheduler().config, prediction_type="v_prediction"))
    assert models.load(v).prediction_type == "v_prediction"
    assert isinstance(models.load(flux()), models.FluxDenoiser)


@pytest.mark.parametrize("breakage,needle", [
    (lambda d: (d / "model_index.json").write_text("{not json"), r"unreadable .*model_index.json"),
    (lambda d: (d / "model_index.json").write_text("[1, 2]"), r"unreadable .*model_index.json: it holds a JSON list"),
    (lambda d: (d / "unet" / "config.json").unlink(), r"declares a unet \(UNet2DConditionModel\) but has no "
                                                      r"unet/config.json"),
    (lambda d: (d / "unet" / "config.json").write_text("{"), r"unreadable .*unet/config.json"),
    (lambda d: (d / "scheduler" / "scheduler_config.json").unlink(), "has no scheduler/scheduler_config.json"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
     r"has no weights for its vae \(AutoencoderKL\): .*vae holds no .safetensors or .bin file"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").rename(
        d / "vae" / "diffusion_pytorch_model.fp16.safetensors"), "has no weights for its vae .*variants"),
    (lambda d: [f.unlink() for f in (d / "text_encoder").glob("*.safetensors")], "no weights for its text_encoder"),
    (lambda d: shutil.rmtree(d / "tokenizer"), r"declares a tokenizer \(\w+\) but has no tokenizer/ "
                                               r"folder"),
    (lambda d: [f.unlink() for f in (d / "tokenizer").iterdir()], "no tokenizer/ folder or an empty one"),
    (lambda d: (d / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(
        (d / "vae" / "diffusion_pytorch_model.safetensors").read_bytes()[:-100]),
     "vae/diffusion_pytorch_model.safetensors is not a readable safetensors file"),
])
def test_a_broken_folder_is_refused_by_what_is_broken(breakage, needle, tmp_path, monkeypatch):
    sd().save_pretrained(tmp_path)
    breakage(tmp_path)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    for dtype in (None, "fp32"):  # a dtype given reads no header for the folder's dtype: checked all the same
        with pytest.raises(UserError, match=needle):
            models.load(tmp_path, dtype=dtype)


def test_a_path_that_is_no_model_folder_says_what_it_is(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    for given, needle in [(tmp_path / "model_index.json", f"diffusers folder's model_index.json; give the folder: "
                                                          f"{tmp_path}"),
                          (tmp_path / "nothing", "(no such file or folder)"),
                          (tmp_path / "empty", "(no model_index.json in it)"),
                          (tmp_path / "empty" / ".." / "model_index.json" / "x", "(no such file or folder)")]:
        with pytest.raises(UserError, match=re.escape(needle)):
            models.load(str(given))
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(UserError, match=re.escape("nor one of sd15, flux-dev, nor a local diffusers folder (a file, not")):
        models.meta.describe(str(tmp_path / "notes.txt"))


def test_a_sharded_checkpoint_missing_a_shard_is_refused_before_loading(tmp_path, monkeypatch):
    sd().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted((tmp_path / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    shards[1].unlink()
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UserError, match=f"unet's diffusion_pytorch_model.safetensors.index.json names shards that "
                                        f"are not there: {shards[1].name}"):
        models.load(tmp_path)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(UserError, match="the unet's weights are in shards, but the index that maps them"):
        models.load(tmp_path)


def test_pickled_weights_are_read_for_their_dtype_or_named_as_damaged(tmp_path):
    sd().save_pretrained(tmp_path, safe_serialization=False)
    unet = tmp_path / "unet" / "diffusion_pytorch_model.bin"
    state = torch.load(unet, weights_only=True)
    assert models.folder_dtype(tmp_path, "unet") == torch.float32
    torch.save({k: v.half() for k, v in state.items()}, unet, _use_new_zipfile_serialization=False)  # legacy format
    assert models.folder_dtype(tmp_path, "unet") == torch.float16
    unet.write_bytes(unet.read_bytes()[:100])
    with pytest.raises(UserError, match="diffusion_pytorch_model.bin cannot be read as weights alone"):
        models.folder_dtype(tmp_path, "unet")
    with pytest.raises(UserError, match=f"model folder {tmp_path} could not be loaded: .*diffusion_pytorch_model.bin"):
        models.load(tmp_path, dtype="fp32")  # read only when loaded: diffusers' error, as one line
