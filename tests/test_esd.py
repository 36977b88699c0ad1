"""ESD's parameter sets (esd-x: cross-attention, esd-u: every other layer) and its noise levels."""
import pytest
import torch
from torch import nn

import fasterase
from fasterase import models
from fasterase.methods import esd
from fasterase.training import params

FAST_ESD = {"steps": 2, "batch_size": 2, "sample_steps": 4}
# (esd-x, esd-u) layer counts; toy-sd: 7 transformer blocks x attn2's 4, toy-flux: 2 joint blocks x 8
COUNTS = {"toy-sd": (28, 91), "toy-flux": (16, 32)}


def tree(names):
    """A module whose linear layers have exactly these dotted names."""
    root = nn.Module()
    for name in names:
        *path, leaf = name.split(".")
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, nn.Module())
            m = getattr(m, part)
        m.add_module(leaf, nn.Linear(2, 2))
    return root


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_sets_partition_the_layers(name):
    model = models.load(name)
    net = model.network
    layers = {n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    x = esd.parameter_modules(net, model.kind, "esd-x")
    u = esd.parameter_modules(net, model.kind, "esd-u")
    assert (len(x), len(u)) == COUNTS[name]
    assert set(x) | set(u) == layers and not set(x) & set(u)
    if model.kind == "sd":
        assert all(".attn2." in n for n in x) and not any(".attn2." in n for n in u)
        convs = {n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
        assert convs and convs <= set(u)  # conv_in/out, resnets, proj_in/out (Conv2d in SD1.x)
    else:
        assert all(n.startswith("transformer_blocks.") and ".attn." in n for n in x)
        assert {n for n in layers if n.startswith("single_transformer_blocks.")} <= set(u)


def test_patterns_are_anchored():
    block = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    net = tree([f"{block}.to_k", f"{block}.to_k_extra", f"wrapper.{block}.to_v", "mid_block.resnets.0.attn2_to_k"])
    assert esd.parameter_modules(net, "sd", "esd-x") == [f"{block}.to_k"]
    flux = tree(["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_q",
                 "transformer_blocks.0.attn.to_qkv", "x.transformer_blocks.0.attn.add_k_proj"])
    assert esd.parameter_modules(flux, "flux", "esd-x") == ["transformer_blocks.0.attn.to_q"]
    assert len(esd.parameter_modules(flux, "flux", "esd-u")) == 3
    with pytest.raises(ValueError, match="no layer"):
        params.layer_names(flux, r"attn")  # a substring is not a match


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_esd_u_edit_loads_in_plain_diffusers_and_draws_the_same_images(name, tmp_path):
    result = fasterase.erase(name, "circle", method="esd", progress=False, **FAST_ESD)
    assert result.edit.report["parameters"] == "esd-u"
    assert result.edit.report["trained_modules"] == COUNTS[name][1]
    if name == "toy-sd":  # the convolutions carry LoRA factors too
        assert any("conv1.lora_A" in k for k in result.edit.lora)
    result.edit.save(tmp_path / "edit")
    pipe = models.load(name).pipeline
    pipe.load_lora_weights(str(tmp_path / "edit"))  # plain diffusers, no fasterase involved
    prompts = ["a red circle", "a blue square"]
    plain, applied = models.load(pipe).generate(prompts, seed=0), result.model.generate(prompts, seed=0)
    torch.testing.assert_close(plain, applied, rtol=0, atol=1e-5)  # toy-flux differs by float rounding (5e-7)


def test_noise_levels_are_drawn_continuously(monkeypatch):
    seen = []
    real = esd.sampling.states
    monkeypatch.setattr(esd.sampling, "states",
                        lambda m, c, steps, taus, *a: seen.extend(taus) or real(m, c, steps, taus, *a))
    model = models.load("toy-sd")
    fasterase.erase(model.pipeline, "circle", method="esd", progress=False, **{**FAST_ESD, "steps": 6})
    grid = model.sampling_taus(FAST_ESD["sample_steps"])
    assert len(seen) == 6 and len(set(seen)) == 6 and all(0 < t <= 1 for t in seen)
    assert not set(seen) & set(grid)  # not the sampler's grid


def test_teacher_keeps_edits_applied_before():
    """Erasing on top of an applied LoRA edit: the teacher is the network as it came (the earlier
    edit on), and only the adapter being trained is switched off; gradient flags come back."""
    from peft import LoraConfig

    model = models.load("toy-sd")
    net = model.network
    modules = esd.parameter_modules(net, model.kind, "esd-x")
    net.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=modules, init_lora_weights=False),
                    adapter_name="earlier")
    x = model.noise(1, torch.Generator().manual_seed(0))
    tau, cond = torch.full((1,), 0.5), model.encode(["a red circle"])
    with torch.no_grad():
        before = model.predict(x, tau, cond)
        net.disable_adapters()
        base = model.predict(x, tau, cond)
        net.enable_adapters()
    assert not torch.allclose(before, base)  # the earlier edit changes the output
    trainable = params.add_lora(net, modules, rank=2, init_seed=0)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.1)  # the new adapter is no longer zero
        assert not torch.allclose(model.predict(x, tau, cond), before)
        with params.lora_off(net):
            teacher = model.predict(x, tau, cond)
    torch.testing.assert_close(teacher, before)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        n for n, p in net.named_parameters() if f".{params.ADAPTER}." in n}


def test_a_checkpoint_is_refused_for_another_resolution_or_noise_schedule(tmp_path):
    """A run's checkpoint resumed at another resolution, or for a pipeline of another prediction type, is
    refused by name before training, not taken as this run's (the touched weights alone are the same)."""
    from diffusers import DDIMScheduler

    from fasterase.errors import UserError

    ckpt = tmp_path / "run.ckpt"
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, ["circle"], None)
    cfg = esd.ESDConfig(**FAST_ESD, checkpoint=str(ckpt))
    esd.run(model, cs, cfg, progress=False)
    model.set_resolution((model.height + 8, model.width))
    with pytest.raises(UserError, match=r"another run: its run.model.size \(\[32, 48\] there, \[40, 48\] here"):
        esd.run(model, cs, cfg, progress=False)
    pipe = models.load("toy-sd").pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    with pytest.raises(UserError, match="another run: its run.model.schedule.prediction_type"):
        esd.run(models.load(pipe), cs, cfg, progress=False)
    with pytest.raises(UserError, match=r"another run: its run.model.kind \('sd' there, 'flux' here\); "
                                        r"\d+ more that follow from it differ"):
        esd.run(models.load("toy-flux"), fasterase.api._resolve_concepts(models.load("toy-flux"), ["circle"], None),
                cfg, progress=False)
    with pytest.raises(UserError, match=r"another run: its run.model.dtype \('float32' there, 'bfloat16' here\); "
                                        r"run.base_fingerprint"):  # the setting first, the hashes after it
        esd.run(models.load("toy-sd", dtype="bf16"), cs, cfg, progress=False)
    esd.run(models.load("toy-sd"), cs, cfg, progress=False)  # the same run resumes (here: finished)
    state = torch.load(ckpt, weights_only=True)
    del state["run"]["model"]  # as fasterase wrote it before 2026-12-03: the setting is not known, not refused
    torch.save(state, ckpt)
    model = models.load("toy-sd")
    model.set_resolution((model.height + 8, model.width))
    esd.run(model, cs, cfg, progress=False)
