"""The erase() API, saved edits and the UCE / ESD methods, on both toy pipelines."""
import os
import subprocess
import sys

import pytest
import torch

import fasterase
from fasterase import Concept, models
from fasterase.edit import Edit
from fasterase.errors import UserError

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


def test_import_is_quiet_and_leaves_log_levels(tmp_path):
    """Importing fasterase prints none of the libraries' notices about backends it never uses (the
    bitsandbytes hub kernel, transformers' torchvision processors), and leaves their levels as set."""
    code = ("import logging; from transformers.utils import logging as t; "
            "logging.getLogger('bitsandbytes').setLevel(logging.INFO); t.set_verbosity_info(); "
            "import fasterase; print(logging.getLogger('bitsandbytes').level, t.get_verbosity())")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["20", "20"]
    assert "kernels-community" not in run.stderr and "torchvision" not in run.stderr, run.stderr


def test_the_repository_root_on_sys_path_leaves_the_pypi_kernels_package_alone():
    """transformers >= 5.25 imports the PyPI package "kernels"; with the repository's root on sys.path
    (`python -m pytest` there) our kernels/ folder stood in its place, and every diffusers import failed.
    Without that package, the bare name still finds the folder (transformers < 5.25 then reads no version)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import importlib.metadata, os, fasterase.kernels as ours\n"
            "try:\n    importlib.metadata.version('kernels')\nexcept importlib.metadata.PackageNotFoundError:\n"
            "    installed = False\nelse:\n    installed = True\n"
            "import kernels\n"
            "assert installed == (os.path.dirname(kernels.__file__) != os.path.dirname(ours.__file__))\n"
            "from transformers.integrations import hub_kernels\n"
            "print(ours.masked_adamw.__module__)")
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["fasterase.kernels.masked_adamw"]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("method,options", [("uce", {}), ("esd", FAST_ESD)])
def test_erase_in_place_and_report(name, method, options, capfd):
    pipe = models.load(name).pipeline
    before = params(pipe)
    capfd.readouterr()
    result = fasterase.erase(pipe, "circle", method=method, progress=False, **options)
    assert "No LoRA keys associated to" not in capfd.readouterr().err  # diffusers' text-encoder notice, dropped
    assert result.pipeline is pipe
    assert result.report["method"] == method and result.report["concepts"] == ["circle"]
    assert result.report["wall_time_s"] > 0 and result.report["steps"] == options.get("steps", 0)
    den = models.load(pipe)  # UCE runs no image: no size recorded
    assert result.report["resolution"] == (None if method == "uce" else [den.height, den.width])
    assert result.edit.touched()
    if method == "uce":  # base weights changed in place, exactly the listed ones
        after = params(pipe)
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed and changed <= set(result.edit.weights)
    else:  # a LoRA adapter over untouched base weights
        assert result.edit.adapter in models.load(pipe).network.peft_config


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
    with pytest.raises(ValueError, match="unknown method 'mace'.*valid: uce, esd, ant, fade, trace"):
        fasterase.erase("toy-sd", "circle", method="mace")
    with pytest.raises(ValueError, match="esd-x, esd-u"):
        fasterase.erase("toy-sd", "circle", method="esd", parameters="esd-z")
    with pytest.raises(ValueError, match=">= 1"):
        fasterase.erase("toy-sd", "circle", method="esd", steps=0)


def test_concept_validation():
    with pytest.raises(ValueError, match="empty"):
        fasterase.erase("toy-sd", [], method="uce")
    with pytest.raises(ValueError, match="empty"):
        fasterase.erase("toy-sd", "  ", method="uce")
    with pytest.raises(ValueError, match="'zebra'.*name no toy shape"):
        fasterase.erase("toy-sd", "zebra", method="uce")
    with pytest.raises(ValueError, match="duplicate"):
        fasterase.erase("toy-sd", ["circle", "circle"], method="uce")
    with pytest.raises(UserError, match="concept"):
        fasterase.erase("toy-sd", 3, method="uce")
    with pytest.raises(ValueError, match="type"):
        Concept("circle", type="animal")
    # the toy world's held-out "a picture of a {}": no method may train on it
    with pytest.raises(UserError, match="held-out prompt.*'a picture of a circle'"):
        fasterase.erase("toy-sd", Concept("circle", templates=("a picture of a {}",)), method="uce")
    with pytest.raises(UserError, match=r"held-out .* a Concept given without templates takes the generic object ones"):
        fasterase.erase("toy-sd", Concept("circle", anchor="square"), method="uce")
    with pytest.raises(UserError, match="more than one shape"):
        fasterase.erase("toy-sd", "circle square", method="uce")
    # a typed Concept with nothing else given is prompted as its bare name
    typed = fasterase.erase("toy-sd", Concept("red", type="style"), method="uce", progress=False).edit.concepts
    assert typed == fasterase.erase("toy-sd", "red", method="uce", progress=False).edit.concepts
    # a word the tokenizer does not know anywhere in the prompts (not only the name) is refused
    with pytest.raises(UserError, match="'zebra'.*does not know"):
        fasterase.erase("toy-sd", Concept("circle", templates=("a zebra {}",)), method="uce")
    with pytest.raises(UserError, match="'purple'.*does not know"):
        fasterase.erase("toy-sd", Concept("circle", templates=("a {}",), attributes=("purple",)), method="uce")


def test_pair_templates_are_checked_like_templates(monkeypatch):
    """UCE's prior names two preserved concepts in the concept's pair templates (TRACE pairs erased ones):
    a word the tokenizer does not know there, or a pair prompt past its limit, trained unnoticed."""
    _no_run(monkeypatch, "uce")
    for pair, match in ((("a {} beside a {}",), "'a square beside a star' of concept 'circle' .* holds 'beside'"),
                        (("{}{}",), "holds 'squarestar'"),
                        (("a photo of a photo of a photo of a photo of a {} and a {}",),
                         r"is 19 tokens, .* holds 16")):
        concept = Concept("circle", templates=("a {}",), pair_templates=pair)
        with pytest.raises(UserError, match=match):
            fasterase.erase("toy-sd", concept, method="uce", preserve=["square", "star"])
    with pytest.raises(UserError, match="'a circle beside a square' of concept 'circle' .* holds 'beside'"):
        fasterase.erase("toy-sd", [Concept("circle", templates=("a {}",), pair_templates=("a {} beside a {}",)),
                                   Concept("square", templates=("a {}",))], method="uce", preserve=[])


def test_unknown_word_check_ignores_special_tokens():
    """CLIP's unknown token is its end token (<|endoftext|>): only the words are checked for it."""
    model = models.load("toy-sd")  # a fresh pipeline: changing its tokenizer touches no other test
    tok = model.pipeline.tokenizer
    tok.unk_token = tok.eos_token
    assert tok.unk_token_id == tok.eos_token_id
    fasterase.erase(model, "circle", method="uce", progress=False)


def test_uce_prior_does_not_depend_on_the_concepts_order():
    """The preserved prompts took the first concept's templates: with two concepts' own templates, the
    edit changed when they were given the other way round."""
    from fasterase.toy.concepts import TEMPLATES
    a = Concept("circle", templates=TEMPLATES[:2], attributes=("red",))
    b = Concept("square", templates=TEMPLATES[2:4])
    forward, backward = (fasterase.erase("toy-sd", cs, method="uce", copy=True, progress=False).edit.weights
                         for cs in ([a, b], [b, a]))
    assert forward.keys() == backward.keys()
    for k in forward:
        torch.testing.assert_close(forward[k], backward[k], rtol=1e-4, atol=1e-5)


def test_evaluate_takes_names_and_checks_its_arguments():
    from fasterase.eval import evaluate
    with pytest.raises(UserError, match="repeats"):  # a registered name is a model, None no erased concept
        evaluate("toy-sd", erased=None, repeats=0)
    with pytest.raises(UserError, match="erased must be concept names"):
        evaluate("toy-sd", erased=[3])


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
    with pytest.raises(ValueError, match="for an SD model, not a FLUX model; it was made on toy-sd"):
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
    with pytest.raises(UserError, match="holds an edit"):
        edit.save(tmp_path / "edit")
    edit.save(tmp_path / "edit", overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["edit"]


def test_esd_training_is_deterministic():
    a = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.lora
    b = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST_ESD).edit.lora
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_uce_moves_the_concept_to_its_guide():
    """After UCE, the edited projections map the concept prompt's inputs toward where the guide
    prompt's inputs went before: at least 20% of the way in every layer and 35% on average (a
    regularised least-squares fit over 20 prompts with four preserved shapes, measured over every
    token of the prompt, does not reach all the way), and a preserved concept's outputs barely move."""
    model = models.load("toy-sd")
    kv = model.cross_attention_kv()
    concept, guide, kept = (model.encode(p) for p in ("a red circle", "a red", "a red square"))
    w0 = [p.module.weight.detach().clone() for p in kv]
    fasterase.erase(model, "circle", method="uce", progress=False)
    left = []  # per layer, the share of the way still to go
    for p, w in zip(kv, w0):
        moved = (concept.embeds @ p.module.weight.T - guide.embeds @ w.T).norm()
        before = (concept.embeds @ w.T - guide.embeds @ w.T).norm()
        left.append((moved / before).item())
        drift = (kept.embeds @ p.module.weight.T - kept.embeds @ w.T).norm()
        assert drift < 0.2 * (kept.embeds @ w.T).norm()
    assert max(left) < 0.8 and sum(left) / len(left) < 0.65, left


@pytest.mark.parametrize("name", MODELS)
def test_uce_keeps_scenes_of_two_kept_shapes(name):
    """Erasing circle and square with a prior of one kept shape per prompt, a scene of two kept shapes
    lost one in 34% (toy-sd) and 37% (toy-flux) of 144 evaluation images; UCE's prior now names two
    kept shapes together too (uncoloured: these scenes are coloured)."""
    from fasterase.toy import detector, shapes
    model = models.load(name)
    fasterase.erase(model, "circle, square", method="uce", progress=False)
    kept, colors = ("triangle", "cross", "star"), shapes.COLORS
    scenes = [((a, colors[k]), (b, colors[k - 1])) for a in kept for b in kept if a != b for k in range(len(colors))]
    prompts = [shapes.caption(t, *scene) for scene in scenes for t in shapes.SCENE_TEMPLATES]
    found = detector.load().classify(model.generate(prompts, seed=0) * 2 - 1)
    both = [all(shape in f for shape, _ in scene) for scene, f in zip(
        [s for s in scenes for _ in shapes.SCENE_TEMPLATES], found)]
    assert sum(both) / len(both) >= 0.9, sum(both) / len(both)


def test_esd_parameter_set_follows_concept_type():
    from fasterase.concepts import as_concepts
    from fasterase.methods import esd

    assert esd.parameter_set(esd.ESDConfig(), as_concepts("circle")) == "esd-u"
    assert esd.parameter_set(esd.ESDConfig(), as_concepts(Concept("van gogh", type="style"))) == "esd-x"
    assert esd.parameter_set(esd.ESDConfig(parameters="esd-x"), as_concepts("circle")) == "esd-x"


def _no_run(monkeypatch, method):
    """Make `method`'s run fail loudly: an error raised instead comes before any work."""
    import dataclasses

    from fasterase.methods import REGISTRY

    def run(*a, **k):
        raise AssertionError(f"{method} ran")

    monkeypatch.setitem(REGISTRY, method, dataclasses.replace(REGISTRY[method], run=run))


@pytest.mark.parametrize("method,options,needle", [
    ("esd", {"steps": "400"}, "'steps' of method 'esd' must be an integer, got '400'"),
    ("esd", {"steps": 4.0}, "must be an integer"),
    ("esd", {"lr": True}, "must be a number"),
    ("esd", {"lr": float("nan")}, "must be a number"),
    ("esd", {"parameters": 1}, "must be text or null"),
    ("ant", {"split": 0}, "must be true or false"),
    ("esd", {"copy": "no"}, "copy must be true or false, got 'no'"),
    ("esd", {"progress": None}, "progress must be true or false"),
    ("uce", {"preserve": " "}, r"preserve=' ' names no concept: .*or preserve=\[\] to preserve none"),
])
def test_option_types(monkeypatch, method, options, needle):
    _no_run(monkeypatch, method)
    with pytest.raises(UserError, match=needle):
        fasterase.erase("toy-sd", "circle", method=method, **options)


def test_numpy_scalars_and_paths_are_options_as_plain_values(tmp_path):
    """np.float32 was 'must be a number' and a Path checkpoint 'must be text'; they are taken as the plain
    values the edit's JSON metadata holds."""
    import numpy as np

    cfg = fasterase.api._options(fasterase.api.registry.get("esd"),
                                 {"lr": np.float32(0.5), "steps": np.int64(3), "checkpoint": tmp_path / "c.pt"})
    assert (cfg.lr, cfg.steps, cfg.checkpoint) == (0.5, 3, str(tmp_path / "c.pt"))
    assert type(cfg.lr) is float and type(cfg.steps) is int
    cfg = fasterase.api._options(fasterase.api.registry.get("ant"), {"saliency": np.bool_(False)})
    assert cfg.saliency is False


@pytest.mark.parametrize("model,concepts,method,options,needle", [
    ("toy-sd", "circle", "ant", {"rank": 8, "lam": 0.2}, "rank: one concept.*lam: one concept"),
    ("toy-sd", "circle", "ant", {"saliency_prompts": 1000}, "saliency_prompts=1000: the concept has 20 augmented"),
    ("toy-sd", "circle", "ant", {"preserve_scale": 2.0}, "preserve_scale: one concept"),
    ("toy-sd", "circle", "ant", {"preserve": "star"}, "preserve: one concept"),
    ("toy-sd", "circle", "ant", {"saliency": False, "saliency_seeds": 2}, "saliency_seeds: saliency=False"),
    ("toy-sd", "circle, square", "ant", {"saliency_threshold": 0.1}, "saliency_threshold: several concepts"),
    ("toy-sd", "circle, square", "ant", {"saliency": True}, "saliency: several concepts"),
    ("toy-sd", "circle, square", "ant", {"preserve": [], "preserve_scale": 2.0}, "none are preserved"),
    ("toy-sd", "circle", "ant", {"split": False, "t_split": 0.5, "lambda2": 1.0}, "t_split: split=False.*lambda2"),
    ("toy-sd", "circle", "uce", {"text_kv": True}, "text_kv: .*SD model"),
    ("toy-flux", "circle", "uce", {"preserve": [], "preserve_scale": 2.0}, "none are preserved"),
    ("toy-sd", "circle", "esd", {"preserve": "star"}, "preserve: ESD has no preservation term"),
    ("toy-sd", "circle", "uce", {"resolution": 64}, "resolution: UCE runs no image through the network"),
    ("toy-flux", "circle", "uce", {"gradient_checkpointing": True, "micro_batch": 2},
     "gradient_checkpointing: UCE runs no image.*micro_batch: UCE"),
    ("toy-sd", "circle", "trace", {"finetune": False, "micro_batch": 2}, "micro_batch: finetune=False"),
])
def test_an_option_that_cannot_act_is_an_error(monkeypatch, model, concepts, method, options, needle):
    _no_run(monkeypatch, method)
    with pytest.raises(UserError, match=needle):
        fasterase.erase(model, concepts, method=method, **options)


def test_options_that_act_are_accepted(monkeypatch):
    """The same options where they act: no error before the method runs."""
    _no_run(monkeypatch, "ant")
    with pytest.raises(AssertionError, match="ran"):
        fasterase.erase("toy-sd", "circle, square", method="ant", rank=8, lam=0.2, preserve="star")
    with pytest.raises(AssertionError, match="ran"):
        fasterase.erase("toy-sd", "circle", method="ant", saliency_seeds=2, split=False, lambda3=1.0)
    _no_run(monkeypatch, "uce")
    with pytest.raises(AssertionError, match="ran"):
        fasterase.erase("toy-flux", "circle", method="uce", text_kv=True, preserve_scale=2.0)
    with pytest.raises(AssertionError, match="ran"):  # text_kv's forwards run at the resolution
        fasterase.erase("toy-flux", "circle", method="uce", text_kv=True, resolution=64)
    with pytest.raises(AssertionError, match="ran"):  # and micro-batched
        fasterase.erase("toy-flux", "circle", method="uce", text_kv=True, micro_batch=2)
    with pytest.raises(UserError, match="gradient_checkpointing: UCE keeps no graph"):
        fasterase.erase("toy-flux", "circle", method="uce", text_kv=True, gradient_checkpointing=True)


def test_uce_text_kv_reads_the_text_stream_at_the_resolution_given():
    """The joint blocks' add_k / add_v inputs come from forwards at the run's size: another size is another
    edit, and the report states it (it said none: UCE was taken to run no image)."""
    small = fasterase.erase("toy-flux", "circle", method="uce", text_kv=True, progress=False)
    large = fasterase.erase("toy-flux", "circle", method="uce", text_kv=True, resolution=64, progress=False)
    assert large.report["resolution"] == [64, 64] and small.report["resolution"] != [64, 64]
    name = sorted(n for n in large.edit.weights if "add_k_proj" in n)[-1]  # block 0's reads no image tokens
    assert not torch.equal(small.edit.weights[name], large.edit.weights[name])


@pytest.mark.parametrize("name", MODELS)
def test_a_prompt_past_the_tokenizer_limit_is_refused(monkeypatch, name):
    _no_run(monkeypatch, "esd")
    long = Concept("circle", templates=("a photo of a {} on a white background next to a red square on a white background",))
    with pytest.raises(UserError, match=r"is 20 tokens, and this model's CLIP tokenizer .* holds 16"):
        fasterase.erase(name, long, method="esd")


def test_flux_t5_limit_is_the_denoisers_max_sequence_length(monkeypatch):
    _no_run(monkeypatch, "uce")
    model = models.load("toy-flux")
    model.max_sequence_length = 8
    concept = Concept("circle", templates=("a drawing of a {} on a white background",))  # 11 tokens in both
    with pytest.raises(UserError, match=r"is 11 tokens, and this model's T5 tokenizer \(max_sequence_length\) holds 8"):
        fasterase.erase(model, concept, method="uce")
    model.max_sequence_length = 11
    with pytest.raises(AssertionError, match="ran"):
        fasterase.erase(model, concept, method="uce")


def test_an_edit_that_changes_nothing_is_an_error(monkeypatch):
    from fasterase.methods import esd, uce

    pipe = models.load("toy-sd").pipeline
    before = params(pipe)
    monkeypatch.setattr(uce, "uce_weights", lambda weights, *a: [w.detach().clone() for w in weights])
    with pytest.raises(UserError, match="uce changed no weight of the model for circle: nothing was erased"):
        fasterase.erase(pipe, "circle", method="uce", progress=False)
    # ESD whose loss has no gradient: its LoRA stays zero (B starts at zero)
    monkeypatch.setattr(esd, "negative_guidance_loss", lambda pred, *a: pred.sum() * 0.0)
    with pytest.raises(UserError, match="esd changed no weight"):
        fasterase.erase(pipe, "circle", method="esd", progress=False, **FAST_ESD)
    assert same(params(pipe), before) and not getattr(pipe.unet, "peft_config", None)


def test_red_circle_preserves_the_other_shapes_only():
    """The default preserve set never holds a shape an erased concept names."""
    result = fasterase.erase("toy-flux", "red circle", method="uce", progress=False)
    assert result.report["concepts"] == ["red circle"]
    assert result.report["preserve"] == ["square", "triangle", "cross", "star"]


def _no_lora(monkeypatch):
    from fasterase.training import params as training_params

    def add_lora(*a, **k):
        raise AssertionError("a LoRA was added")

    monkeypatch.setattr(training_params, "add_lora", add_lora)


@pytest.mark.parametrize("model,concepts,method,rank,needle", [
    ("toy-sd", "circle", "esd", 100000, r"rank=100000 exceeds .* at most 128 \(time_embedding"),
    ("toy-sd", "circle", "esd", 129, "rank=129 exceeds"),
    ("toy-flux", "circle", "esd", 129, "rank=129 exceeds .* at most 128"),
    ("toy-sd", "circle, square", "ant", 65, "rank=65 exceeds .* at most 64"),
])
def test_a_lora_rank_past_its_layers_is_refused_before_training(monkeypatch, model, concepts, method, rank, needle):
    _no_lora(monkeypatch)
    with pytest.raises(UserError, match=needle):
        fasterase.erase(model, concepts, method=method, rank=rank, progress=False)


def test_a_lora_rank_its_layers_hold_trains(monkeypatch):
    _no_lora(monkeypatch)
    with pytest.raises(AssertionError, match="a LoRA was added"):
        fasterase.erase("toy-sd", "circle", method="esd", rank=8, progress=False)  # conv_out has 4 channels


@pytest.mark.parametrize("concepts,preserve,needle", [
    ("circle xyzzy", None, r"\['circle xyzzy'\] hold words that are no toy shape or colour \(xyzzy\)"),
    ("circle", "xyzzy", r"preserved concept\(s\) \['xyzzy'\] are not shapes, and this edit erases shapes"),
    ("circle", "red circle", r"\['red circle'\] are both erased and preserved"),
    ("small", None, r"\['small'\] name no toy shape or colour.*circle, square, triangle, cross, star\) or a colour \(red"),
    ("circle, blue", None, r"\['circle', 'blue'\] mix shapes and colours"),
    ("red", "circle", r"\['circle'\] are not colours, and this edit erases colours"),
])
@pytest.mark.parametrize("model", MODELS)
def test_concepts_that_cannot_act_are_refused(monkeypatch, model, concepts, preserve, needle):
    _no_run(monkeypatch, "uce")
    with pytest.raises(UserError, match=needle):
        fasterase.erase(model, concepts, method="uce", preserve=preserve)


def test_a_preserved_word_no_tokenizer_knows_is_refused_outside_the_toy_world(monkeypatch):
    model = models.load("toy-sd")
    model.pipeline.tokenizer.add_tokens(["zebra"])  # one more word: a model of another world
    _no_run(monkeypatch, "uce")
    with pytest.raises(UserError, match=r"preserved concept 'xyzzy': the word\(s\) 'xyzzy' tokenize to nothing"):
        fasterase.erase(model, "circle", method="uce", preserve="xyzzy")
