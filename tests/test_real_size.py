"""The real models' published configs (fasterase.models.real_configs), built on the meta device, and
scripts/make_real_size.py: its tokenizers, and a slim FLUX folder it writes, loaded and run."""
import importlib.util
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from fasterase import api, models
from fasterase.concepts import as_concepts
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


# --- scripts/make_real_size.py --------------------------------------------------------------------
SCRIPT = Path(__file__).parents[1] / "scripts" / "make_real_size.py"
PROMPTS = ["a photo of a circle", "A Red Circle, 4k, highly detailed!", "Van Gogh's starry night (1889) at the café",
           "an astronaut riding a horse on the moon; digital art - trending on artstation"]


def load_script():
    spec = importlib.util.spec_from_file_location("make_real_size", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def flux_folder(script, tmp_path_factory):
    """FLUX.1-dev's widths with one block of each kind and one T5 layer, in bf16."""
    out = tmp_path_factory.mktemp("real") / "flux-small"
    script.main(["flux-dev", str(out), "--joint-blocks", "1", "--single-blocks", "1", "--t5-layers", "1",
                 "--dtype", "bf16"])
    yield out
    shutil.rmtree(out)  # 2 GB, not kept with pytest's last temporary folders


def test_tokenizers_know_every_english_prompt_within_the_embedding_tables(script):
    clip, t5 = script.clip_tokenizer(49408), script.t5_tokenizer()
    assert (clip.model_max_length, t5.model_max_length) == (77, 512)
    for tok, rows in ((clip, 49408), (t5, 32128)):
        for ids in tok(PROMPTS).input_ids:
            assert tok.unk_token_id not in ids[1:-1] and max(ids) < rows
    assert clip("a circle").input_ids[0] == 49406 and clip("a circle").input_ids[-1] == 49407 == clip.eos_token_id


@pytest.mark.parametrize("which", ["clip", "t5"])
def test_a_word_alone_runs_inside_every_prompt_that_holds_it(script, which):
    """What Denoiser.word_rows matches: the word's ids, tokenized alone, inside the prompt's ids."""
    tok = script.clip_tokenizer(49408) if which == "clip" else script.t5_tokenizer()
    for word, prompt in [("circle", "a photo of a circle"), ("circle", "a red circle, at night"),
                         ("starry night", PROMPTS[2]), ("horse", PROMPTS[3])]:
        run, seq = tok(word, add_special_tokens=False).input_ids, tok(prompt).input_ids
        assert any(seq[i:i + len(run)] == run for i in range(len(seq))), (word, prompt)


def test_sd15_pipeline_is_the_published_one(script):
    with torch.device("meta"):
        pipeline = script.build("sd15", torch.bfloat16, 0, {})
    index = real_configs.model_index("sd15")
    for part, (_, cls) in ((p, s) for p, s in index.items() if isinstance(s, list)):
        assert (type(pipeline.components[part]).__name__ if cls else None) == cls
    assert _count(pipeline.unet) == NETWORKS["sd15"] and pipeline.unet.dtype == torch.bfloat16
    assert pipeline.text_encoder.get_input_embeddings().num_embeddings == 49408
    assert pipeline.tokenizer.model_max_length == 77


def test_written_flux_folder_loads_encodes_and_predicts(flux_folder):
    den = models.load(str(flux_folder))
    assert den.kind == "flux" and len(den.network.transformer_blocks) == 1 and den.network.inner_dim == 3072
    assert den.pipeline.text_encoder_2.get_input_embeddings().num_embeddings == 32128
    api._check_prompts(den, as_concepts(["circle"], ["square"]))
    prompts = ["a photo of a circle", "a red circle at night"]
    assert den.word_rows(prompts, ["circle"]) == [[13, 14, 15, 16, 17, 18, 19], [6, 7, 8, 9, 10, 11, 12]]
    den.set_size(64, 64)
    cond = den.encode(prompts[:1])
    assert cond.embeds.shape == (1, 512, 4096) and cond.pooled.shape == (1, 768)
    with torch.no_grad():
        out = den.predict(den.noise(1, torch.Generator().manual_seed(0)), torch.full((1,), 0.5), cond)
    assert out.shape == (1, 16, 64) and out.isfinite().all()


def test_written_flux_folder_generates_with_the_diffusers_pipeline(flux_folder):
    pipeline = DiffusionPipeline.from_pretrained(str(flux_folder), dtype=torch.bfloat16)
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline("a photo of a circle", height=64, width=64, num_inference_steps=1, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 3, 64, 64) and images.isfinite().all()


def test_a_training_method_runs_on_the_written_flux_folder(flux_folder):
    """ESD, one step at 64 px, on FLUX.1-dev's widths: the run's identity samples every text-encoder tensor,
    CLIP's and T5's token embeddings of over 2^24 entries included (sampled in fp32 positions, the last one
    rounded up past the end: every training method failed on real-size folders)."""
    edit = api.erase(str(flux_folder), "circle", method="esd", steps=1, sample_steps=1, batch_size=1,
                     resolution=64, progress=False).edit
    assert edit.report["steps"] == 1
    assert any(v.abs().max() > 0 for k, v in edit.lora.items() if "lora_B" in k)


def test_a_component_is_its_seeds_random_init(script, flux_folder):
    """The folder's VAE is what the VAE's own seed builds, whatever the other components' sizes."""
    torch.manual_seed(script.component_seed(0, "vae"))
    built = script.component("flux-dev", "vae", "AutoencoderKL", torch.bfloat16, {}).state_dict()
    saved = AutoencoderKL.from_pretrained(str(flux_folder / "vae"), dtype=torch.bfloat16).state_dict()
    assert built.keys() == saved.keys() and all(torch.equal(built[k], saved[k]) for k in built)


def test_an_existing_folder_is_refused_and_left_as_it_was(script, tmp_path, capsys):
    (tmp_path / "kept.txt").write_text("mine")
    with pytest.raises(SystemExit) as exit_:
        script.main(["sd15", str(tmp_path)])
    assert exit_.value.code == 2 and "is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]
    with pytest.raises(SystemExit):
        script.main(["sd15", str(tmp_path / "new"), "--t5-layers", "2"])
    assert "--t5-layers: only flux-dev has fewer blocks" in capsys.readouterr().err


@pytest.fixture
def sd15_folder(script, tmp_path):
    """The whole SD1.5 (860M UNet) in its published fp32: 4 GB, written in about 20 s."""
    script.main(["sd15", str(tmp_path / "sd15")])
    yield tmp_path / "sd15"
    shutil.rmtree(tmp_path / "sd15")


@pytest.mark.slow
def test_written_sd15_folder_loads_and_generates(sd15_folder):
    den = models.load(str(sd15_folder))
    assert den.kind == "sd" and _count(den.network) == NETWORKS["sd15"] and den.height == 512
    api._check_prompts(den, as_concepts(["circle"], ["square"]))
    assert den.word_rows(["a photo of a circle"], ["circle"]) == [[10, 11, 12, 13, 14, 15]]
    den.set_size(64, 64)
    den.sample_kwargs.update(num_inference_steps=1)
    images = den.generate(["a photo of a circle"], seed=0)
    assert images.shape == (1, 3, 64, 64) and images.isfinite().all()
