"""The erase() API, saved edits and the UCE / ESD methods, on both toy pipelines."""
import os

import pytest
import torch

import fasterase
from fasterase import Concept, models
from fasterase.edit import Edit

MODELS = ["toy-sd", "toy-flux"]
FAST_ESD = {"steps": 2, "batch_size": 2, "sample_steps": 4}


def params(pipeline_or_model):
    net = models.load(pipeline_or_model).network
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def prediction(model, prompt="a red circle"):
    model = models.load(model)
    x = model.noise(2, torch.Generator().manual_seed(0))
    return model.predict(x, torch.tensor([0.8, 0.3]), model.encode([prompt] * 2))


def test_methods_listed():
    m = fasterase.methods()
    assert {"uce", "esd"} <= set(m) and all(isinstance(v, str) and v for v in m.values())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method,options", [("uce", {}), ("esd", FAST_ESD)])
def test_erase_in_place_and_report(name, method, options):
    pipe = models.load(name).pipeline
    before = params(pipe)
    result = fasterase.erase(pipe, "circle", method=method, progress=False, **options)
    assert result.pipeline is pipe
    assert result.report["method"] == method and result.report["concepts"] == ["circle"]
    assert result.report["wall_time_s"] > 0 and result.report["steps"] == options.get("steps", 0)
    assert result.edit.touched()
    if method == "uce":  # base weights changed in place, exactly the listed ones
        after = params(pipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= set(result.edit.weights)
    else:  # a LoRA adapter over untouched base weights
        assert "fasterase" in models.load(pipe).network.peft_config


@pytest.mark.parametrize("name", MODELS)
def test_copy_leaves_the_pipeline_untouched(name):
    pipe = models.load(name).pipeline
    before = params(pipe)
    result = fasterase.erase(pipe, ["circle"], method="uce", copy=True, progress=False)
    assert result.pipeline is not pipe
    assert same(params(pipe), before)
    assert not same(params(result.pipeline), before)


def test_option_validation():
    with pytest.raises(ValueError, match="valid: .*lam"):
        fasterase.erase("toy-sd", "circle", method="uce", lamda=0.1)
    with pytest.raises(ValueError, match="unknown method 'fade'.*valid: uce, esd"):
        fasterase.erase("toy-sd", "circle", method="fade")
    with pytest.raises(ValueError, match="esd-x, esd-u"):
        fasterase.erase("toy-sd", "circle", method="esd", parameters="esd-z")
    with pytest.raises(ValueError, match=">= 1"):
        fasterase.erase("toy-sd", "circle", method="esd", steps=0)


def test_concept_validation():
    with pytest.raises(ValueError, match="empty"):
        fasterase.erase("toy-sd", [], method="uce")
    with pytest.raises(ValueError, match="empty"):
        fasterase.erase("toy-sd", "  ", method="uce")
    with pytest.raises(ValueError, match="tokenizes to nothing"):
        fasterase.erase("toy-sd", "zebra", method="uce")
    with pytest.raises(ValueError, match="duplicate"):
        fasterase.erase("toy-sd", ["circle", "circle"], method="uce")
    with pytest.raises(TypeError, match="concept"):
        fasterase.erase("toy-sd", 3, method="uce")
    with pytest.raises(ValueError, match="type"):
        Concept("circle", type="animal")


def test_failed_training_rolls_back(monkeypatch):
    from fasterase.methods import esd

    pipe = models.load("toy-sd").pipeline
    before = params(pipe)
    monkeypatch.setattr(esd, "negative_guidance_loss", lambda pred, *a: pred.sum() * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        fasterase.erase(pipe, "circle", method="esd", progress=False, **FAST_ESD)
    assert not getattr(pipe.unet, "peft_config", None)
    assert same(params(pipe), before)


def test_failed_apply_rolls_back(monkeypatch):
    model = models.load("toy-flux")
    before = params(model.pipeline)
    edit = fasterase.erase("toy-flux", "circle", method="uce", progress=False).edit
    edit.lora = {"transformer.x.lora_A.weight": torch.zeros(1)}  # a LoRA part that will fail to load
    monkeypatch.setattr(Edit, "check_fits", lambda self, m: None)
    with pytest.raises(Exception):
        edit.apply(model)
    assert same(params(model.pipeline), before)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method,options", [("uce", {}), ("esd", FAST_ESD)])
def test_save_load_round_trip_is_bit_exact(name, method, options, tmp_path):
    result = fasterase.erase(name, "circle", method=method, progress=False, **options)
    expected = prediction(result.model)
    path = result.edit.save(tmp_path / "edit")
    assert sorted(os.listdir(tmp_path)) == ["edit"]
    loaded = Edit.load(path)
    assert loaded.method == method and loaded.concepts[0]["name"] == "circle"
    assert loaded.weights.keys() == result.edit.weights.keys()
    assert all(torch.equal(loaded.weights[k], result.edit.weights[k]) for k in loaded.weights)
    pipe = fasterase.load(name, path)
    assert torch.equal(prediction(pipe), expected)
    assert not torch.equal(prediction(name), expected)


@pytest.mark.parametrize("name", MODELS)
def test_lora_edit_loads_through_diffusers(name, tmp_path):
    result = fasterase.erase(name, "circle", method="esd", progress=False, **FAST_ESD)
    result.edit.save(tmp_path / "edit")
    pipe = models.load(name).pipeline
    pipe.load_lora_weights(str(tmp_path / "edit"))  # plain diffusers, no fasterase involved
    assert torch.equal(prediction(pipe), prediction(result.model))


def test_edit_must_fit_the_model(tmp_path):
    edit = fasterase.erase("toy-sd", "circle", method="uce", progress=False).edit
    edit.save(tmp_path / "e")
    with pytest.raises(ValueError, match="sd model, not a flux"):
        fasterase.load("toy-flux", tmp_path / "e")
    other = models.load("toy-sd")
    with torch.no_grad():
        other.cross_attention_kv()[0].module.weight.add_(1e-3)
    with pytest.raises(ValueError, match="different base model"):
        fasterase.load(other, tmp_path / "e")


def test_atomic_save(tmp_path, monkeypatch):
    import fasterase.edit as edit_mod

    edit = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit
    calls = []
    real = edit_mod.save_file

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if path.endswith("pytorch_lora_weights.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(edit_mod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        edit.save(tmp_path / "edit")
    assert len(calls) == 2 and os.listdir(tmp_path) == []
    monkeypatch.setattr(edit_mod, "save_file", real)
    edit.save(tmp_path / "edit")
    with pytest.raises(FileExistsError):
        edit.save(tmp_path / "edit")
    edit.save(tmp_path / "edit", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["edit"]


def test_esd_training_is_deterministic():
    a = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.lora
    b = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.lora
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uce_moves_the_concept_to_its_guide():
    """After UCE, the edited projections map the concept prompt's inputs close to where the
    guide prompt's inputs went before, and a preserved concept's outputs barely move."""
    model = models.load("toy-sd")
    kv = model.cross_attention_kv()
    concept, guide, kept = (model.encode(p) for p in ("a red circle", "a red", "a red square"))
    w0 = [p.module.weight.detach().clone() for p in kv]
    fasterase.erase(model, "circle", method="uce", progress=False)
    for p, w in zip(kv, w0):
        moved = (concept.embeds @ p.module.weight.T - guide.embeds @ w.T).norm()
        before = (concept.embeds @ w.T - guide.embeds @ w.T).norm()
        assert moved < 0.5 * before
        drift = (kept.embeds @ p.module.weight.T - kept.embeds @ w.T).norm()
        assert drift < 0.2 * (kept.embeds @ w.T).norm()


def test_esd_parameter_set_follows_concept_type():
    from fasterase.concepts import as_concepts
    from fasterase.methods import esd

    assert esd.parameter_set(esd.ESDConfig(), as_concepts("circle")) == "esd-u"
    assert esd.parameter_set(esd.ESDConfig(), as_concepts(Concept("van gogh", type="style"))) == "esd-x"
    assert esd.parameter_set(esd.ESDConfig(parameters="esd-x"), as_concepts("circle")) == "esd-x"
