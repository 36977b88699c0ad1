"""Both adapters: shapes, the tau convention, rollouts, the K/V list, the loader."""
import ast
from pathlib import Path

import pytest
import torch
from diffusers import EulerDiscreteScheduler

from fasterase import models
from fasterase.errors import UserError
from fasterase.models import Cond


@pytest.fixture(scope="module", params=["toy-sd", "toy-flux"])
def model(request):
    return models.load(request.param)


def test_kind_and_name(model):
    assert model.kind == {"toy-sd": "sd", "toy-flux": "flux"}[model.name]
    assert isinstance(model.network, torch.nn.Module)


def test_encode_is_cached_and_batched(model):
    cond = model.encode(["a red circle", "a blue star", "a red circle"])
    assert len(cond) == 3
    assert torch.equal(cond.embeds[0], cond.embeds[2])
    assert not torch.equal(cond.embeds[0], cond.embeds[1])
    assert (cond.pooled is None) == (model.kind == "sd")
    calls = []
    hook = model.pipeline.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        model.encode(["a red circle", "a blue star"])
    finally:
        hook.remove()
    assert calls == []  # served from the cache
    assert torch.equal(model.uncond.embeds[0], model.encode("").embeds[0])


def test_training_noise_has_the_sampled_image_size(model):
    """Rollouts and training noise are at the size evaluation samples (the toy world's 32x48, not square)."""
    from fasterase.toy import shapes

    assert (model.height, model.width) == (shapes.HEIGHT, shapes.WIDTH)
    assert model.decode(model.noise(1, torch.Generator().manual_seed(0))).shape == (1, 3, shapes.HEIGHT, shapes.WIDTH)


def test_predict_shape(model):
    x = model.noise(3, torch.Generator().manual_seed(0))
    out = model.predict(x, torch.tensor([0.9, 0.5, 0.1]), model.encode(["a red circle"] * 3))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_flux_position_ids_are_the_pipelines_at_each_size():
    """FluxDenoiser makes its image position ids on the device they are used on (the planner's meta), as
    FluxPipeline._prepare_latent_image_ids makes them on the CPU, and anew after a size change."""
    from diffusers import FluxPipeline

    den = models.load("toy-flux")
    for height, width in ((32, 48), (80, 24)):
        den.set_resolution((height, width))
        m = den.size_multiple  # px per token
        want = FluxPipeline._prepare_latent_image_ids(1, height // m, width // m, "cpu", torch.float32)
        assert torch.equal(den.image_ids("cpu"), want)
        assert den.image_ids("meta").shape == want.shape and den.image_ids("meta").is_meta


def test_tau_convention(model):
    """tau = 1 is (almost) pure noise, tau = 0 is (almost) the clean latent."""
    g = torch.Generator().manual_seed(0)
    x0, eps = model.noise(4, g), model.noise(4, g)
    hi = model.add_noise(x0, eps, torch.ones(4))
    lo = model.add_noise(x0, eps, torch.zeros(4))
    assert (hi - eps).abs().mean() < 0.1 * (hi - x0).abs().mean()
    assert (lo - x0).abs().mean() < 0.1 * (lo - eps).abs().mean()


def test_target_matches_forward_process(model):
    """Integrating the target over tau reproduces the forward process for flow models; for
    epsilon models the target is the noise."""
    g = torch.Generator().manual_seed(1)
    x0, eps = model.noise(2, g), model.noise(2, g)
    tau = torch.tensor([0.3, 0.7])
    tgt = model.target(x0, eps, tau)
    if model.kind == "flux":
        d = 1e-3
        fd = (model.add_noise(x0, eps, tau + d) - model.add_noise(x0, eps, tau - d)) / (2 * d)
        assert torch.allclose(tgt, fd, atol=1e-3)
    else:
        assert torch.equal(tgt, eps)


def test_rollout_stops_at_until(model):
    cond = model.encode(["a red circle"] * 2)
    g = torch.Generator().manual_seed(0)
    x, tau = model.rollout(cond, steps=10, until=0.5, generator=g)
    assert x.shape == model.noise(2).shape
    assert tau <= 0.5 and tau > 0.3  # the first sampler step at or below 0.5
    # the same seed to the end is deterministic and further along
    x_end, tau_end = model.rollout(cond, steps=10, until=0.0, generator=torch.Generator().manual_seed(0))
    assert tau_end == 0.0
    x_mid, _ = model.rollout(cond, steps=10, until=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x, x_mid)


def test_rollout_decodes_to_the_prompted_shape(model):
    from fasterase.toy import detector

    cond = model.encode(["a red square"] * 8)
    x0, _ = model.rollout(cond, steps=20, generator=torch.Generator().manual_seed(0))
    found = detector.load().classify(model.decode(x0) * 2 - 1)
    assert sum(f.get("square") == "red" for f in found) >= 6


def test_cross_attention_kv(model):
    kv = model.cross_attention_kv()
    names = [p.name for p in kv]
    assert len(names) == len(set(names))
    net = model.network
    if model.kind == "sd":
        n_attn2 = sum(1 for n, _ in net.named_modules() if n.endswith("attn2"))
        assert n_attn2 > 0 and len(kv) == 2 * n_attn2
        assert all(n.endswith(("attn2.to_k", "attn2.to_v")) for n in names)
    else:
        assert names[:2] == ["context_embedder", "time_text_embed.text_embedder.linear_1"]
        assert len(kv) == 2 + 2 * len(net.transformer_blocks)
    modules = dict(net.named_modules())
    for p in kv:
        assert modules[p.name] is p.module and isinstance(p.module, torch.nn.Linear)
    inputs = model.kv_inputs(model.encode(["a red circle", "a disk"]))
    assert set(inputs) == set(names)
    for p in kv:
        assert inputs[p.name].shape[0] == 2 and inputs[p.name].shape[-1] == p.module.in_features
    if model.kind == "sd":  # every cross-attention reads the text encoder output itself
        emb = model.encode(["a red circle", "a disk"]).embeds
        assert all(torch.allclose(v, emb) for v in inputs.values())


def test_save_load_round_trip(model, tmp_path):
    model.pipeline.save_pretrained(tmp_path)
    again = models.load(tmp_path)
    assert type(again) is type(model) and again.sample_kwargs == model.sample_kwargs
    a, b = model.network.state_dict(), again.network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # weights bit-exact
    assert torch.equal(model.encode("a red star").embeds, again.encode("a red star").embeds)
    # outputs agree to fp32 rounding (oneDNN may order a reduction differently for new buffers)
    x = model.noise(1, torch.Generator().manual_seed(0))
    t = torch.tensor([0.5])
    assert torch.allclose(model.predict(x, t, model.encode("a red star")),
                          again.predict(x, t, again.encode("a red star")), atol=1e-5)
    assert torch.allclose(model.generate(["a red star"], seed=3), again.generate(["a red star"], seed=3), atol=1e-3)


def test_pipeline_call_returns_an_image(model):
    from PIL import Image

    kwargs = {"num_inference_steps": 2}
    if model.kind == "flux":  # FLUX pipelines default to 1024 px; ask for the toy's 32 px
        kwargs.update(height=32, width=32)
    image = model.pipeline("a red circle", **kwargs).images[0]
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="toy-sd"):
        models.load("toy-unknown")
    with pytest.raises(UserError, match="model_index.json"):
        models.load(tmp_path)
    with pytest.raises(UserError, match="supported: Stable Diffusion"):
        models.load(42)
    with pytest.raises(UserError, match="supported: Stable Diffusion"):
        models.load(torch.nn.Linear(2, 2))


def test_rollouts_do_not_depend_on_the_shipped_scheduler():
    """An SD checkpoint shipped with an Euler scheduler rolls out as with DDIM: the sampler is built
    from the scheduler's config, so x_t stays in the parametrization add_noise and predict use."""
    ddim = models.load("toy-sd")
    pipe = models.load("toy-sd").pipeline
    # "leading" spacing: Euler's own sampling then visits DDIM's timesteps
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading")
    euler = models.load(pipe)
    prompts = ["a red circle", "a blue square"]
    cond = ddim.encode(prompts)
    assert euler.sampling_taus(10) == ddim.sampling_taus(10)
    for until in (0.5, 0.0):  # the same sampler on the same network and noise: bit-identical
        a, tau_a = ddim.rollout(cond, 10, until=until, generator=torch.Generator().manual_seed(0))
        b, tau_b = euler.rollout(cond, 10, until=until, generator=torch.Generator().manual_seed(0))
        assert tau_a == tau_b and torch.equal(a, b)
    # and it is the model's own distribution: Euler (with init_noise_sigma and scale_model_input,
    # through the pipeline) is the same ODE step in the sigma parametrization, except that it ends
    # at sigma 0 where DDIM stops at alphas_cumprod[0] (set_alpha_to_one=False): a last-step offset
    # of sqrt(1 - alphas_cumprod[0]) = 0.029 times the predicted noise, 2.3% of the latents here.
    # Sampling with the Euler scheduler on unscaled latents (the old rollout) is 81% off.
    pipe.set_progress_bar_config(disable=True)
    noise = ddim.noise(2, torch.Generator().manual_seed(0))
    own = pipe(prompts, latents=noise, num_inference_steps=10, guidance_scale=3.0, output_type="latent").images
    assert (b - own).norm() / own.norm() < 0.05


def test_no_model_module_imports_the_toy_world():
    """models/ sits below the toy world: the toy pipelines plug into the loader from above."""
    for path in (Path(models.__file__).parent).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any(n in ("..toy", "fasterase.toy", "toy") or n.startswith(("..toy.", "fasterase.toy."))
                           for n in names), f"{path.name} imports the toy world: {names}"


def test_registered_names_load_with_their_sample_kwargs(monkeypatch):
    from fasterase.toy import components

    monkeypatch.setattr(models, "BUILTINS", dict(models.BUILTINS))
    models.register("my-sd", components.sd_pipeline, {"num_inference_steps": 3},
                    lambda p: p.scheduler.config.get("steps_offset") == 1)
    model = models.load("my-sd")
    assert model.name == "my-sd" and model.sample_kwargs == {"num_inference_steps": 3}
    with pytest.raises(UserError, match="toy-sd, toy-flux, my-sd"):
        models.load("my-flux")


def test_cond_helpers():
    c = Cond(torch.arange(6.).view(2, 3, 1), torch.arange(2.).view(2, 1))
    r = c.repeat(2)
    assert r.embeds[:, 0, 0].tolist() == [0, 0, 3, 3] and r.pooled[:, 0].tolist() == [0, 0, 1, 1]
    assert len(Cond.cat([c, r])) == 6


def test_keep_network_casts_the_network_but_leaves_it_where_it_is(monkeypatch):
    """ZeRO-3 partitions the network onto the device (training.engine.partitioned): load() casts it and
    moves only the other components there."""
    den = models.load("toy-sd")
    calls = []
    for cls in {type(den.network), type(den.pipeline.vae)}:
        monkeypatch.setattr(cls, "to", lambda self, *a, _to=cls.to, **k: calls.append((self, a, k)) or _to(self, *a, **k))
    models.load(den, "cpu", "bf16", keep_network=True)
    assert den.network.dtype == torch.bfloat16 and den.pipeline.vae.dtype == torch.bfloat16
    to_device = [m for m, a, k in calls
                 if k.get("device") is not None or any(x is not None and not isinstance(x, torch.dtype) for x in a)]
    assert den.pipeline.vae in to_device and den.network not in to_device


def test_a_cast_prints_no_empty_keep_in_fp32_warning(capfd):
    """diffusers 0.42 warns on every dtype cast that a model has modules to keep in fp32, listing none."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_warning()  # the CLI's tests may have quieted it in this process
    try:
        capfd.readouterr()
        assert models.load(models.load("toy-sd").pipeline, dtype="bf16").network.dtype == torch.bfloat16
        assert "should be kept in float32: []" not in capfd.readouterr().err
    finally:
        diffusers_logging.set_verbosity(level)


@pytest.mark.parametrize("name,encoder", [("toy-sd", "text_encoder"), ("toy-flux", "text_encoder_2")])
def test_non_finite_embeddings_are_refused_naming_the_dtype(name, encoder):
    """An fp16 text encoder whose activations pass 65504 (T5-XXL's do) gives inf embeddings: every
    method would train on them or write them into weights, so encode() refuses them."""
    model = models.load(name, dtype=torch.float16)
    norm = [m for n, m in getattr(model.pipeline, encoder).named_modules() if n.endswith("final_layer_norm")][-1]
    with torch.no_grad():
        norm.weight.fill_(6e4)  # the token embeddings' last layer: its outputs overflow fp16
    with pytest.raises(UserError, match=r"non-finite \(NaN or inf\) embeddings in float16 for the prompt "
                                        r"'a red circle' and 1 more; load the model in bfloat16 or float32"):
        model.encode(["a red circle", "a blue star"])
    assert model._cache == {}  # nothing half-cached
    model.pipeline.to(dtype=torch.float32)  # finite weights no longer overflow: NaN weights do, in any dtype
    with torch.no_grad():
        norm.weight[0] = float("nan")
    with pytest.raises(UserError, match=r"in float32 for the prompt 'a red circle'; the text encoders' weights may be "
                                        r"damaged"):
        model.encode(["a red circle"])
