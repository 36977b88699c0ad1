"""TRACE (methods/trace.py): the refinement of eq. (1), the target trajectory, gradient isolation,
the merged LoRAs and their loading through diffusers, resume, options."""
from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from safetensors.torch import load_file

import fasterase
from fasterase import models, ops
from fasterase.concepts import Concept, as_concepts
from fasterase.edit import EDIT_FILE, Edit
from fasterase.errors import UserError
from fasterase.methods import trace
from fasterase.toy import concepts as toy_concepts
from fasterase.training import loop, params, sampling
from edit_testing import interrupted_step

MODELS = ["toy-sd", "toy-flux"]
FAST = {"steps": 3, "batch_size": 2, "rollouts": 2, "refresh_every": 2, "sample_steps": 8, "d_pretrain_steps": 30,
        "d_batch": 16}


def state(model):
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


def concepts(*names, preserve=("square",)):
    return as_concepts([toy_concepts.concept(n) for n in names], preserve=list(preserve))


# --- phase 1 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_refined_projections_read_the_text_encoding_itself(name):
    """Where eq. (1) is exact: what feeds every refined projection is encode()'s token rows, for any x_t."""
    model = models.load(name)
    cond = model.encode(["a photo of a circle", "a red square"])
    inputs = model.kv_inputs(cond)
    for p in trace.refined_projections(model):
        torch.testing.assert_close(inputs[p.name].float(), cond.embeds.float())
    if name == "toy-flux":  # the joint blocks' text stream is not the encoding: no fixed e_w there
        assert [p.name for p in trace.refined_projections(model)] == ["context_embedder"]
        block = inputs["transformer_blocks.0.attn.add_k_proj"]
        assert block.shape[-1] != cond.embeds.shape[-1] or not torch.allclose(block.float(), cond.embeds.float())


@pytest.mark.parametrize("name", MODELS)
def test_refinement_maps_the_concept_rows_exactly_on_every_layer(name):
    """(W + dW) e_w = W e_u on every refined layer of the real toy pipelines, for two concepts at once."""
    model = models.load(name)
    cs = concepts("circle", "square", preserve=())
    cfg = trace.TRACEConfig()
    e_u, e_w = trace.refinement_embeddings(model, cs, "eos")
    assert e_w.shape[0] == 2  # one token each
    original = trace.refine(model, cs, cfg)
    for p in trace.refined_projections(model):
        w0, w1 = original[p.name].double(), p.module.weight.detach().double()
        assert not torch.equal(w0, w1)
        torch.testing.assert_close(w1 @ e_w.double().t(), w0 @ e_u.double().t(), rtol=1e-4, atol=1e-4)
    trace.put(model, original)


def test_refinement_is_one_call_of_the_batched_op(monkeypatch):
    model = models.load("toy-sd")
    calls = []
    real = ops.rank_one_update
    monkeypatch.setattr(trace.ops, "rank_one_update", lambda w, *a, **k: (calls.append(len(w)), real(w, *a, **k)))
    before = state(model)
    edit = trace.run(model, concepts("circle"), trace.TRACEConfig(finetune=False), progress=False)
    assert calls == [len(trace.refined_projections(model))] and len(edit.weights) == calls[0]
    assert all(torch.equal(before[k], v) for k, v in state(model).items())  # the model leaves as it came
    assert not edit.lora and edit.report["refined_layers"] == calls[0]


def test_eta_damps_the_refinement():
    model = models.load("toy-sd")
    cs = concepts("circle")
    full = trace.run(model, cs, trace.TRACEConfig(finetune=False), progress=False)
    half = trace.run(model, cs, trace.TRACEConfig(finetune=False, eta=0.5), progress=False)
    for name, w in full.weights.items():
        w0 = model.network.get_parameter(name).detach().double()
        torch.testing.assert_close(half.weights[name].double() - w0, 0.5 * (w.double() - w0), rtol=1e-4, atol=1e-6)


def test_anchor_token_needs_an_anchor():
    with pytest.raises(UserError, match="anchor"):
        fasterase.erase("toy-sd", "circle", method="trace", finetune=False, neutral_token="anchor", progress=False)
    fasterase.erase("toy-sd", "red", method="trace", finetune=False, neutral_token="anchor", progress=False)  # grey


def test_the_target_replaces_the_concept_by_one_word():
    """L_traj regresses onto x*: every concept prompt's target names the same word, the first preserved
    concept (or `neutral`), never FADE's preserved names in turn."""
    cs = as_concepts([toy_concepts.concept("circle")], preserve=["square", "triangle", "star"])
    pairs = trace.target_pairs(cs, trace.TRACEConfig())
    assert len(pairs.neutral) == len(pairs.concept) > 3
    assert all("square" in t and "circle" not in t for t in pairs.neutral)
    assert [t for t, _ in pairs.concept] == [t.replace("square", "circle") for t in pairs.neutral]
    assert all("star" in t for t in trace.target_pairs(cs, trace.TRACEConfig(neutral="star")).neutral)
    alone = as_concepts([Concept("circle", anchor="disc")])
    assert all("disc" in t for t in trace.target_pairs(alone, trace.TRACEConfig()).neutral)
    assert trace.target_words(cs, trace.TRACEConfig()) == ["square"]
    assert trace.target_words(alone, trace.TRACEConfig()) == ["disc"]


# --- phase 2 ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_target_trajectory_switches_at_t0(name):
    """x*: the concept prompt's own run before the switch step, then the neutral prompt's run from there."""
    model = models.load(name)
    before, after = model.encode(["a photo of a circle"] * 2), model.encode(["a photo of a square"] * 2)
    x = model.noise(2, torch.Generator().manual_seed(0))
    own, tau = sampling.switched_rollout(model, before, before, 6, 6, 3.0, x)
    star, _ = sampling.switched_rollout(model, before, after, 3, 6, 3.0, x)
    assert tau[-1] == 0 and len(own) == 7
    torch.testing.assert_close(star[:4], own[:4])
    assert not torch.allclose(star[4:], own[4:])
    # from the switch on, it is the neutral prompt's run from the concept's state there
    t, to = torch.full((2,), float(tau[3])), torch.full((2,), float(tau[4]))
    with torch.no_grad():
        step = sampling.step_to(model, star[3], model.guided(star[3], t, after, 3.0), t, to)
    torch.testing.assert_close(step, star[4])


def _two_concept_setup(name="toy-sd", **options):
    model = models.load(name)
    cs = concepts("circle", "square", preserve=("triangle",))
    cfg = trace.TRACEConfig(**{**FAST, "scorer": "none", "integration": False, **options})
    modules = [p.name for p in model.cross_attention_kv()]
    names = ["fasterase_0", "fasterase_1"]
    groups = [params.add_lora(model.network, modules, cfg.rank, k, adapter=a) for k, a in enumerate(names)]
    for group in groups:  # a trained LoRA: the B factors start at zero
        for p in group:
            p.requires_grad_(True)
            torch.nn.init.normal_(p.data, std=0.05)
    teacher = lambda: params.lora_off(model.network, tuple(names))  # noqa: E731
    pairs = trace._pair_prompts(cs) if cfg.integration else []
    traj = trace.Trajectories(model, trace.target_pairs(cs, cfg), pairs, 2, cfg, teacher)
    traj.refresh(loop.step_generator(0, 9))
    return model, cs, cfg, groups, traj, teacher


def _grads(model, loss_fn, groups, step=1):
    """Each LoRA's gradient after one backward of loss_fn(step), as the training loop takes it (.grad: the
    isolated terms deliver theirs through a nested backward, which torch.autograd.grad() does not see)."""
    for p in (p for g in groups for p in g):
        p.grad = None
    loss_fn(step, loop.step_generator(0, step)).backward()
    return [[torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in g] for g in groups]


def _changed(before, after):
    return [any(not torch.equal(a, b) for a, b in zip(x, y)) for x, y in zip(before, after)]


def test_a_concepts_loss_reaches_only_its_own_lora():
    """Gradient isolation (Sec. 4.3): changing concept 0's targets changes LoRA 0's gradient only; the clean
    terms run with each concept's rows, for its LoRA: changing their targets changes both."""
    model, cs, cfg, groups, traj, teacher = _two_concept_setup(lambda_drift=0.0)
    loss_fn = trace.trace_loss(model, traj, groups, 2, cfg, teacher)
    before = _grads(model, loss_fn, groups)
    traj.buffer["x_end"][traj.buffer["kind"] == 0] += 1.0
    after = _grads(model, loss_fn, groups)
    assert _changed(before, after) == [True, False]
    # and concept 1's targets reach LoRA 1 only
    traj.buffer["x_end"][traj.buffer["kind"] == 1] += 1.0
    again = _grads(model, loss_fn, groups)
    assert _changed(after, again) == [False, True]
    traj.buffer["x_end"][traj.buffer["kind"] == trace.CLEAN] += 1.0
    assert _changed(again, _grads(model, loss_fn, groups)) == [True, True]


@pytest.mark.parametrize("name", MODELS)
def test_isolation_holds_where_backward_runs_the_network_again(name):
    """micro_batch reruns each chunk in backward, gradient checkpointing each block: concept 0's targets still
    reach LoRA 0 only (the rerun saw the forward's flags: no graph through LoRA 1, no checkpoint mismatch),
    and the gradients are the whole passes' (up to the chunks' summation order)."""
    model, cs, cfg, groups, traj, teacher = _two_concept_setup(name, lambda_drift=0.0)
    loss_fn = trace.trace_loss(model, traj, groups, 2, cfg, teacher)
    targets = traj.buffer["x_end"].clone()
    whole = _grads(model, loss_fn, groups)
    for option in ("micro_batch", "gradient_checkpointing"):
        if option == "micro_batch":
            model.micro_batch = 2  # the guided passes hold 2 x batch_size rows: two chunks
        else:
            model.network.enable_gradient_checkpointing()
        try:
            traj.buffer["x_end"] = targets.clone()
            before = _grads(model, loss_fn, groups)
            for ours, reference in zip(before, whole):
                for a, b in zip(ours, reference):
                    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            traj.buffer["x_end"][traj.buffer["kind"] == 0] += 1.0
            assert _changed(before, _grads(model, loss_fn, groups)) == [True, False], option
        finally:
            model.micro_batch = None
            model.network.disable_gradient_checkpointing()


def test_several_concepts_train_with_gradient_checkpointing_and_micro_batch():
    """A short two-concept run with both memory options, its integration term at step 0, completes."""
    result = fasterase.erase("toy-flux", "circle, square", method="trace", progress=False,
                             gradient_checkpointing=True, micro_batch=2, **{**FAST, "steps": 2})
    assert result.report["loras"] == 2
    assert result.report["last_terms"]["int"] == result.report["last_terms"]["int"]  # L_int ran (not NaN)


def test_integration_term_reaches_both_loras_of_its_pair():
    """The same step on the same buffer, with and without L_int: both LoRAs' gradients change."""
    model, cs, cfg, groups, traj, teacher = _two_concept_setup(lambda_traj=0.0, lambda_keep=0.0, lambda_drift=0.0,
                                                                lambda_score=1.0, scorer="discriminator",
                                                                integration=True, refresh_every=100)
    assert (traj.buffer["kind"] == trace.PAIR).sum() == cfg.rollouts
    with_int = _grads(model, trace.trace_loss(model, traj, groups, 2, cfg, teacher), groups, step=4)
    without = dataclasses.replace(cfg, integration=False)
    no_int = _grads(model, trace.trace_loss(model, traj, groups, 2, without, teacher), groups, step=4)
    for k in range(2):
        assert any(not torch.equal(a, b) for a, b in zip(no_int[k], with_int[k]))


def test_teacher_is_the_original_model(monkeypatch):
    """Inside the teacher the network computes the original weights' output: refinement and LoRAs off."""
    model = models.load("toy-sd")
    x = model.noise(2, torch.Generator().manual_seed(1))
    tau, cond = torch.full((2,), 0.4), model.encode(["a circle", "a red square"])
    with torch.no_grad():
        reference = model.predict(x, tau, cond)
    seen = {}
    real = trace.Trajectories.refresh

    def spy(self, g):
        with torch.no_grad():
            seen["edited"] = model.predict(x, tau, cond)
            with self.teacher():
                seen["teacher"] = model.predict(x, tau, cond)
        return real(self, g)

    monkeypatch.setattr(trace.Trajectories, "refresh", spy)
    # the refresh of step 2 comes after two optimizer steps: the LoRAs are no longer zero there
    edit = trace.run(model, concepts("circle"), trace.TRACEConfig(**{**FAST, "scorer": "none", "lr": 0.05}),
                     progress=False)
    assert any(v.abs().sum() > 0 for k, v in edit.lora.items() if "lora_B" in k)
    torch.testing.assert_close(seen["teacher"], reference)
    with torch.no_grad():
        trace.refine(model, concepts("circle"), trace.TRACEConfig())
        refined_only = model.predict(x, tau, cond)
    assert not torch.allclose(seen["edited"], refined_only)  # the LoRAs were on outside the teacher


# --- the edit: merged LoRAs, diffusers loading ---------------------------------------------------

@pytest.fixture(scope="module")
def two_concept_edit():
    model = models.load("toy-sd")
    edit = trace.run(model, concepts("circle", "square", preserve=("triangle",)),
                     trace.TRACEConfig(**{**FAST, "scorer": "none"}), progress=False)
    return edit


def test_joined_adapter_adds_every_loras_change():
    """lora_state of several adapters: one adapter whose B A is the sum of theirs."""
    model = models.load("toy-sd")
    modules = [p.name for p in model.cross_attention_kv()]
    names = ("fasterase_0", "fasterase_1")
    for k, a in enumerate(names):
        for p in params.add_lora(model.network, modules, 2, k, adapter=a):
            torch.nn.init.normal_(p.data, std=0.1)
    joined = params.lora_state(model.network, "unet", names)
    for m in modules:
        a, b = joined[f"unet.{m}.lora_A.weight"], joined[f"unet.{m}.lora_B.weight"]
        expected = sum(params.lora_delta(model.network, m, n) for n in names)
        torch.testing.assert_close(b @ a, expected, rtol=1e-5, atol=1e-6)


def test_loras_are_joined_into_one_adapter(two_concept_edit):
    edit = two_concept_edit
    assert edit.report["loras"] == 2 and edit.weights
    a = [v for k, v in edit.lora.items() if k.endswith("lora_A.weight")]
    assert a and all(t.shape[0] == 2 * 4 for t in a)  # rank 4 each, joined along the rank
    assert set(edit.touched()) >= set(edit.weights)


@pytest.mark.parametrize("name", MODELS)
def test_merge_is_refinement_plus_the_joined_lora(name, tmp_path):
    """Applied, the model computes W0 + B A of the joined adapter; a saved pipeline has exactly that merged."""
    model = models.load(name)
    edit = trace.run(model, concepts("circle", "square", preserve=("triangle",)),
                     trace.TRACEConfig(**{**FAST, "steps": 2, "scorer": "none"}), progress=False)
    prefix = "unet." if name == "toy-sd" else "transformer."
    edit.apply(model)
    edit.save(tmp_path / "edit", pipeline=model)
    component = "unet" if name == "toy-sd" else "transformer"
    saved = load_file(str(next((tmp_path / "edit" / "pipeline" / component).glob("*.safetensors"))))
    for key, a in edit.lora.items():
        if not key.endswith("lora_A.weight"):
            continue
        module = key[len(prefix):-len(".lora_A.weight")]
        b = edit.lora[key.replace("lora_A", "lora_B")]
        base = edit.weights.get(f"{module}.weight")
        if base is None:
            base = models.load(name).network.get_parameter(f"{module}.weight")
        expected = base.float() + b.float() @ a.float()
        torch.testing.assert_close(saved[f"{module}.weight"].float(), expected, rtol=1e-5, atol=1e-6)


def test_diffusers_loads_the_edit_as_lora_weights(two_concept_edit, tmp_path):
    """Plain diffusers: the refined weights from edit.safetensors, then pipe.load_lora_weights(folder)
    gives what Edit.apply gives."""
    path = two_concept_edit.save(tmp_path / "edit")
    ours = models.load("toy-sd")
    Edit.load(path).apply(ours)
    plain = models.load("toy-sd").pipeline
    plain.unet.load_state_dict(load_file(str(path / EDIT_FILE)), strict=False)
    plain.load_lora_weights(str(path))
    x = ours.noise(2, torch.Generator().manual_seed(3))
    tau, cond = torch.full((2,), 0.3), ours.encode(["a photo of a circle", "a square"])
    with torch.no_grad():
        a = ours.predict(x, tau, cond)
        b = plain.unet(x, ours.timestep(tau), cond.embeds).sample.float()
    torch.testing.assert_close(a, b)
    with torch.no_grad():
        bare = models.load("toy-sd").predict(x, tau, cond)
    assert not torch.allclose(a, bare)


# --- runs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, device):
    cs = concepts("circle")
    cfg = {**FAST, "steps": 5}
    full = trace.run(models.load("toy-sd", device=device), cs, trace.TRACEConfig(**cfg), progress=False)
    ckpt = tmp_path / "trace.ckpt"
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda *a, **k: real_train(*a, **{**k, "checkpoint_every": 1}))
    real_draw, calls = trace.Trajectories.draw, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # step 3 (3 draws a step), which does not refresh: the buffer is step 2's
            raise KeyboardInterrupt
        return real_draw(self, *args, **kwargs)

    monkeypatch.setattr(trace.Trajectories, "draw", interrupted)
    resumable = trace.TRACEConfig(**cfg, checkpoint=str(ckpt))
    run = lambda model: trace.run(model, cs, resumable, progress=False)  # noqa: E731
    assert interrupted_step(run, ckpt, device) == 3
    monkeypatch.setattr(trace.Trajectories, "draw", real_draw)
    monkeypatch.setattr(trace.Trajectories, "train_scorer", lambda *a: pytest.fail("the scorer was trained again"))
    resumed = trace.run(models.load("toy-sd", device=device), cs, trace.TRACEConfig(**cfg, checkpoint=str(ckpt)),
                        progress=False)
    assert resumed.lora.keys() == full.lora.keys()
    for k, v in full.lora.items():
        assert torch.equal(resumed.lora[k], v), k
    assert resumed.report["scorer_accuracy"] == full.report["scorer_accuracy"]


def test_a_checkpoint_of_another_preserve_set_is_refused(tmp_path, monkeypatch):
    """The preserved names are TRACE's targets and clean prompts: a checkpoint trained toward another
    preserve set is refused before any work, not resumed as this run's."""
    model, cs, cfg = models.load("toy-sd"), concepts("circle"), trace.TRACEConfig(**FAST)
    ckpt = tmp_path / "trace.ckpt"
    run = loop.identity("trace", cs, cfg, "x", model.setting(), ["triangle"])
    torch.save({"fasterase_checkpoint": loop.FORMAT, "run": run}, ckpt)
    monkeypatch.setattr(trace, "refine", lambda *a: pytest.fail("the run started"))
    with pytest.raises(UserError, match=r"belongs to another run: .*run.preserve \(\['triangle'\] there, \['square'\]"):
        trace.run(model, cs, dataclasses.replace(cfg, checkpoint=str(ckpt)), progress=False)


def test_erase_through_the_api_on_flux():
    result = fasterase.erase("toy-flux", "circle", method="trace", progress=False, **FAST)
    assert result.report["loras"] == 1 and result.report["refined_layers"] == 1
    assert result.report["scorer_accuracy"] > 0.6


@pytest.mark.parametrize("options,needle", [
    ({"eta": 0}, "eta"),
    ({"eta": 1.5}, "eta"),
    ({"t0": 1.0}, "t0"),
    ({"neutral_token": "pad"}, "neutral_token"),
    ({"scorer": "nudenet"}, "scorer"),
    ({"refine": False, "finetune": False}, "nothing to do"),
    ({"rank": 0}, "rank"),
    ({"lambda_traj": -1}, "lambda_traj"),
    ({"int_every": 0}, "int_every"),
    ({"separate": "yes"}, "separate"),
    ({"rank": 10 ** 6}, "exceeds the rank"),
    ({"finetune": False, "lr": 0.1}, "lr: finetune=False"),
    ({"separate": False}, "several concepts"),
    ({"t0": 0.99}, "no sampler step on one side"),
    ({"scorer": "none", "int_every": 2}, "trains no scorer"),
    ({"neutral": "red circle"}, "names a concept being erased"),
])
def test_bad_options(options, needle):
    with pytest.raises(UserError, match=needle):
        fasterase.erase("toy-sd", "circle", method="trace", progress=False, **{**FAST, **options})


def test_a_concept_the_model_does_not_draw_is_refused():
    with pytest.raises(UserError, match="no better than"):  # the neutral pair draws the concept: its synonym
        fasterase.erase("toy-sd", "circle", method="trace", progress=False, **{**FAST, "neutral": "disk"})


@pytest.mark.parametrize("method,t0", [("trace", 0.999), ("fade", 0.999)])
def test_t0_off_the_grid_is_refused_before_any_work(method, t0, monkeypatch):
    """t0 with no sampler step on one side is one of the checks erase makes before any work (and before
    DeepSpeed starts), not found once the method runs."""
    methods = importlib.import_module("fasterase.methods")  # the package (fasterase.methods is the listing)
    registry = dict(methods.REGISTRY)
    ran = dataclasses.replace(registry[method], run=lambda *a, **k: pytest.fail("the method ran"))
    monkeypatch.setattr(methods, "REGISTRY", {**registry, method: ran})
    with pytest.raises(UserError, match=f"option t0={t0:g} leaves no sampler step on one side"):
        fasterase.erase("toy-sd", "circle", method=method, progress=False, t0=t0, zero=3)


def test_a_neutral_word_the_tokenizer_does_not_know_is_refused_before_any_work(monkeypatch):
    """neutral="a dog" on the toy world (no dog in its vocabulary) trained toward <unk>; it is named instead."""
    monkeypatch.setattr(trace, "refine", lambda *a, **k: pytest.fail("the run started"))
    with pytest.raises(UserError, match="TRACE option neutral 'a dog': the model's tokenizer does not know 'dog'"):
        fasterase.erase("toy-sd", "circle", method="trace", progress=False, **{**FAST, "neutral": "a dog"})
