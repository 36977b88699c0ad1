"""FADE: the discriminator's loss and update, the removal and preservation terms, salient entries,
the switched-off teacher, several concepts, early stopping, resume, options; and no method ever
touching the evaluation's detector."""
import dataclasses

import pytest
import torch

import fasterase
from fasterase import models
from fasterase.concepts import Concept, as_concepts
from fasterase.errors import UserError
from fasterase.methods import fade
from fasterase.toy import concepts as toy_concepts
from fasterase.toy import detector
from fasterase.training import discriminator, loop, params, sampling
from fasterase.training.prompt_pairs import prompt_pairs
from edit_testing import interrupted_step, moved_entries

MODELS = ["toy-sd", "toy-flux"]
FAST = {"steps": 3, "batch_size": 2, "rollouts": 4, "refresh_every": 2, "sample_steps": 6, "d_pretrain_steps": 30,
        "d_batch": 16, "d_steps": 1, "saliency_samples": 2, "stop_patience": 100}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "cache"))


def state(model):
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


# --- the discriminator ----------------------------------------------------------------------------

def test_discriminator_loss_is_per_head_bce():
    """Sec. 4.1's BCE per head: concept k's generation has target 1 on head k only, a neutral one 0 on all."""
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0], [-2.0, 0.25]])
    concept = torch.tensor([0, 1, -1])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    p = torch.sigmoid(logits)
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(discriminator.discriminator_loss(logits, concept), expected)


def test_removal_loss_reads_each_generations_own_head():
    logits = torch.tensor([[2.0, -1.0], [0.5, 3.0]], requires_grad=True)
    loss = discriminator.removal_loss(logits, torch.tensor([0, 1]))
    expected = -(torch.log(1 - torch.sigmoid(torch.tensor(2.0))) + torch.log(1 - torch.sigmoid(torch.tensor(3.0)))) / 2
    torch.testing.assert_close(loss, expected)
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad[0, 1] == 0 and grad[1, 0] == 0 and grad[0, 0] > 0 and grad[1, 1] > 0  # other heads untouched


def test_accuracy_counts_own_head_and_all_absent():
    logits = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, 2.0]])
    # concept 0 said present (right); concept 1 said absent (wrong); neutral all absent (right); neutral one present
    assert discriminator.accuracy(logits, torch.tensor([0, 1, -1, -1])) == 0.5


def test_discriminator_update_separates_hand_made_generations():
    """train_d on a buffer whose concept generations are bright blobs and neutral ones empty latents."""
    model = models.load("toy-sd")
    cfg = fade.FADEConfig(**{**FAST, "d_batch": 32})
    prompts = prompt_pairs(as_concepts([toy_concepts.concept("circle")]), cfg.neutral)
    adv = fade.Adversary(model, prompts, 1, cfg)
    g = torch.Generator().manual_seed(0)
    shape = model.noise(1, g).shape[1:]
    n, steps = 8, 3
    blob = torch.zeros(shape)
    blob[:, 2:6, 4:8] = 2.0
    x0 = torch.stack([torch.stack([blob + 0.1 * torch.randn(shape, generator=g) if i < n // 2
                                   else 0.1 * torch.randn(shape, generator=g) for i in range(n)]) for _ in range(steps)])
    adv.buffer = {"x": x0.clone(), "tau": torch.tensor([0.9, 0.5, 0.1]), "x0": x0,
                  "kind": torch.tensor([0] * (n // 2) + [fade.NEUTRAL] * (n // 2)), "pair": torch.zeros(n).long(),
                  "text": torch.zeros(n).long()}
    first = adv.train_d(g)
    for _ in range(100):
        last = adv.train_d(g)
    assert last < 0.5 * first
    assert adv.held_back_accuracy(0) == 1.0
    assert not any(p.requires_grad for p in adv.d.parameters())  # D is frozen outside its own step


@pytest.mark.parametrize("name", MODELS)
def test_discriminator_reads_each_models_latents(name):
    model = models.load(name)
    cfg = fade.FADEConfig(**FAST)
    cs = as_concepts([toy_concepts.concept(n) for n in ("circle", "square", "star")])
    adv = fade.Adversary(model, prompt_pairs(cs, cfg.neutral), len(cs), cfg)
    x = model.noise(3, torch.Generator().manual_seed(0))
    assert adv.d(model.latent_image(x)).shape == (3, 3)  # one head per concept


# --- prompts, x_0 and the buffer -------------------------------------------------------------------

def test_neutral_prompts_pair_the_concept_prompts():
    """P_-c: each concept prompt with the name replaced by the preserved concepts in turn (same template and
    attribute), by `neutral` when given, by the anchor when nothing is preserved."""
    c = Concept("circle", templates=("a photo of a {}", "a {} on a white background"), attributes=("red",))
    p = prompt_pairs(as_concepts([c], preserve=["square", "star"]), fade.FADEConfig().neutral)
    assert [t for t, _ in p.concept] == c.prompts(augment=True)
    assert p.neutral == ["a photo of a square", "a star on a white background", "a photo of a red square",
                         "a red star on a white background"]
    assert "a photo of a square" in p.preserved
    given = prompt_pairs(as_concepts([c], preserve=["square"]), fade.FADEConfig(neutral="").neutral)
    assert given.neutral == ["a photo of a", "a on a white background", "a photo of a red", "a red on a white background"]
    alone = prompt_pairs(as_concepts([dataclasses.replace(c, anchor="shape")]), fade.FADEConfig().neutral)
    assert alone.neutral[0] == "a photo of a shape" and alone.preserved == []


@pytest.mark.parametrize("name", MODELS)
def test_clean_latents_are_what_the_prediction_implies(name):
    """x_0 from (x_t, prediction) inverts add_noise / target: noising x_0 again gives x_t back."""
    model = models.load(name)
    g = torch.Generator().manual_seed(1)
    x0, n = model.noise(2, g), model.noise(2, g)
    tau = torch.tensor([0.3, 0.8])
    x = model.add_noise(x0, n, tau)
    got, noise = sampling.split(model, x, model.target(x0, n, tau), tau)
    torch.testing.assert_close(got, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(noise, n, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_rollout_keeps_every_step_of_one_sampling_run(name):
    model = models.load(name)
    cond = model.encode(["a photo of a circle", "a photo of a square"])
    noise = model.noise(2, torch.Generator().manual_seed(2))
    xs, taus, x0s = sampling.rollout_predictions(model, cond, 5, 2.0, noise)
    assert xs.shape[:2] == (5, 2) and x0s.shape == xs.shape and taus.tolist() == pytest.approx(model.sampling_taus(5))
    assert torch.equal(xs[0], noise)
    (x3,) = model.trajectory(cond, 5, [3], 2.0, x=noise)
    torch.testing.assert_close(xs[3], x3)


# --- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_only_salient_entries_change(name, monkeypatch):
    model = models.load(name)
    before = state(model)
    cs = fasterase.api._resolve_concepts(model, "circle", None)
    masks, make = [], params.CompactDelta.__init__
    monkeypatch.setattr(params.CompactDelta, "__init__", lambda self, net, m: masks.append(m) or make(self, net, m))
    edit = fade.run(model, cs, fade.FADEConfig(**FAST), progress=False)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())  # run() leaves the model as it was
    report = edit.report
    assert edit.config["lambda_pres"] == fade.LAMBDA_PRES["object"]  # the concept type's, recorded
    assert 0 < report["saliency_selected"] == report["trained_entries"] < report["saliency_candidates"]
    assert report["trained_entries"] <= 0.05 * report["saliency_candidates"] + 50  # the top share (ties kept)
    edit.apply(model)
    assert moved_entries(before, state(model), edit, selected=masks[0]) > 0


def test_teacher_is_the_switched_off_edit(monkeypatch):
    """L_pres's teacher predictions run on the network itself with the trained entries at their base
    values (no second copy); the student's, after the first update, on the trained ones."""
    model = models.load("toy-sd")
    net = model.network
    cs = fasterase.api._resolve_concepts(model, "circle", None)
    original = {k: v.clone() for k, v in net.state_dict().items()}
    calls, inside = [], []
    real_predict, real_off = model.predict, params.CompactDelta.off

    def spy(x, tau, cond):
        same = all(torch.equal(v, original[k]) for k, v in net.state_dict().items())
        calls.append((bool(inside), same, torch.is_grad_enabled()))
        return real_predict(x, tau, cond)

    def off(self):
        cm = real_off(self)

        class Tracked:
            def __enter__(self_):
                cm.__enter__()
                inside.append(1)

            def __exit__(self_, *exc):
                inside.pop()
                return cm.__exit__(*exc)

        return Tracked()

    monkeypatch.setattr(model, "predict", spy)
    monkeypatch.setattr(params.CompactDelta, "off", off)
    fade.run(model, cs, fade.FADEConfig(**{**FAST, "steps": 3}), progress=False)
    teacher = [c for c in calls if c[0]]
    assert len(teacher) == 3 and all(same and not grad for _, same, grad in teacher)
    assert any(not same and grad for is_teacher, same, grad in calls if not is_teacher)  # the student, trained


def test_removal_gradient_reaches_only_the_trained_entries(monkeypatch):
    """The optimizer steps the salient entries' fp32 masters only, each with a gradient of just its
    entries; no network parameter holds a gradient."""
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, "circle", None)
    grads, changes = {}, []
    real = fade.SalientAdamW.step
    real_init = params.CompactDelta.__init__

    def spy(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                grads[id(p)] = (p.grad is not None and bool(p.grad.abs().sum() > 0), p.grad.numel())
        assert all(p.grad is None for p in model.network.parameters())
        return real(self, closure)

    def init(self, *a):
        real_init(self, *a)
        changes.append(self)

    monkeypatch.setattr(fade.SalientAdamW, "step", spy)
    monkeypatch.setattr(params.CompactDelta, "__init__", init)
    edit = fade.run(model, cs, fade.FADEConfig(**{**FAST, "steps": 1}), progress=False)
    (change,) = changes
    assert grads and any(nonzero for nonzero, _ in grads.values())
    assert set(change.values) == set(edit.entries) | set(edit.weights)
    # the optimizer holds the salient entries only, a gradient entry for each
    assert grads == {id(v): (grads[id(v)][0], change.indices[n].numel()) for n, v in change.values.items()}
    assert all(not p.requires_grad for p in model.network.parameters())  # and leaves every weight frozen


def test_several_concepts_one_run_one_head_each(monkeypatch):
    """Appendix B: one D with a head per concept, and L_rem reads each generation's own concept's head."""
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, ["circle", "square"], None)
    heads, read = [], []
    real_init, real_removal = fade.Adversary.__init__, fade.removal_loss
    monkeypatch.setattr(fade.Adversary, "__init__",
                        lambda self, *a: real_init(self, *a) or heads.append(self.d.head.out_features))
    monkeypatch.setattr(fade, "removal_loss",
                        lambda logits, kind: read.append(kind.tolist()) or real_removal(logits, kind))
    edit = fade.run(model, cs, fade.FADEConfig(**{**FAST, "steps": 6, "batch_size": 4}), progress=False)
    assert [c["name"] for c in edit.concepts] == ["circle", "square"]
    assert heads == [2] and edit.report["trained_entries"] > 0
    assert {k for kinds in read for k in kinds} == {0, 1}  # both concepts' generations, each on its own head
    logits, kind = torch.tensor([[3.0, -2.0], [0.5, 1.5]]), torch.tensor([1, 0])
    expected = torch.nn.functional.softplus(torch.tensor([-2.0, 0.5])).mean()
    torch.testing.assert_close(real_removal(logits, kind), expected)


def test_ablations_change_what_they_say(monkeypatch):
    """Table 2's variants: removal=l2 never reads D in the model's loss, lambda_pres=0 never runs the
    switched-off teacher, saliency=False trains every entry."""
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, ["circle"], None)

    def forbidden(*a, **k):
        raise AssertionError("called")

    with monkeypatch.context() as m:
        m.setattr(fade, "removal_loss", forbidden)
        l2 = fade.run(model, cs, fade.FADEConfig(**FAST, removal="l2"), progress=False)
    net = model.network
    assert any(not torch.equal(values, net.get_parameter(n).detach().reshape(-1)[idx.long()])
               for n, (idx, values) in l2.entries.items())  # trained without D
    with monkeypatch.context() as m:
        m.setattr(params.CompactDelta, "off", forbidden)
        fade.run(model, cs, fade.FADEConfig(**FAST, lambda_pres=0.0), progress=False)
    every = fade.run(model, cs, fade.FADEConfig(**FAST, saliency=False), progress=False)
    total = sum(p.numel() for p in model.network.parameters() if p.is_floating_point())
    assert every.report["trained_entries"] == total
    assert not every.entries and every.weights.keys() == dict(model.network.named_parameters()).keys()


def test_a_checkpoint_of_another_run_is_refused_before_any_work(tmp_path, monkeypatch):
    """Another method's (or another concept set's, or another preserve set's: D and the loss read the
    preserved prompts) checkpoint is named as such before D or the buffer is touched, not read as this run's."""
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, ["circle"], None)
    ckpt = tmp_path / "other.ckpt"
    other = fasterase.api._resolve_concepts(model, ["circle", "square"], None)
    kept = fasterase.api._resolve_concepts(model, ["circle"], ["square"]).preserve
    for method, concepts, preserve, needle in (("trace", cs, cs.preserve, "run.method"),
                                               ("fade", other, other.preserve, "run.concepts"),
                                               ("fade", cs, kept, r".*run.preserve \(\['square'\] there")):
        run = loop.identity(method, concepts, fade.FADEConfig(**FAST), "x", model.setting(), preserve)
        torch.save({"fasterase_checkpoint": loop.FORMAT, "run": run, "companion": {"d": {}}}, ckpt)
        monkeypatch.setattr(fade.Adversary, "refresh", lambda *a: pytest.fail("the run started"))
        with pytest.raises(UserError, match=f"belongs to another run: its {needle}"):
            fade.run(model, cs, fade.FADEConfig(**FAST, checkpoint=str(ckpt)), progress=False)


@pytest.mark.parametrize("reads,stop", [
    # refreshes at steps 0, 2, 4, 6: three in a row within 0.5 +- 0.05 after step 6
    ([(0.9, 0.8, 0.2), (0.52, 0.5, 0.49), (0.47, 0.53, 0.51), (0.5, 0.5, 0.5)], 7),
    # accuracy at chance, but D calls every sample "absent" (it lags the model): training goes on
    ([(0.9, 0.8, 0.2)] + [(0.5, 0.1, 0.1)] * 3, None),
])
def test_stops_when_the_discriminator_is_at_chance(monkeypatch, reads, stop):
    """Sec. 4.3's rule: D's held-back accuracy and its mean outputs on x_c and on x_-c near 0.5."""
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, "circle", None)
    values = iter(reads + [(0.5, 0.5, 0.5)] * 20)
    real = fade.Adversary.held_back_accuracy
    calls = []

    def fake(self, step):
        value = real(self, step)
        calls.append(step)
        if len(calls) == 1:  # the check after pretraining keeps its real value
            return value
        self.curve[-1] = (step, *next(values))
        return self.curve[-1][1]

    monkeypatch.setattr(fade.Adversary, "held_back_accuracy", fake)
    steps = 8 if stop is None else 40
    edit = fade.run(model, cs, fade.FADEConfig(**{**FAST, "steps": steps, "refresh_every": 2, "stop_patience": 3}),
                    progress=False)
    assert edit.report["steps"] == (steps if stop is None else stop)
    assert edit.report["stopped_early"] == (stop is not None)
    assert edit.report["d_accuracy"] == [(2 * i, *r) for i, r in enumerate(reads)]


def test_a_checkpoint_from_before_the_outputs_is_refused():
    """A checkpoint whose D curve holds accuracy only (older fasterase) is refused by name, not misread."""
    model = models.load("toy-sd")
    cs = as_concepts([toy_concepts.concept("circle")])
    cfg = fade.FADEConfig(**FAST)
    adv = fade.Adversary(model, prompt_pairs(cs, cfg.neutral), 1, cfg)
    state = adv.state_dict()
    state["curve"] = [[0, 0.9], [2, 0.5]]
    with pytest.raises(UserError, match="older fasterase"):
        adv.load_state_dict(state)


def test_mean_outputs_read_each_generations_own_head():
    """D's mean probability on the concept generations' own heads, and on the neutral ones' paired heads."""
    logits = torch.tensor([[0.0, 5.0], [-5.0, 2.0], [1.0, -1.0], [3.0, 0.0]])
    concept = torch.tensor([0, 1, -1, -1])
    head = torch.tensor([0, 1, 0, 1])
    p_concept, p_neutral = discriminator.mean_outputs(logits, concept, head)
    s = torch.sigmoid
    assert p_concept == pytest.approx(float((s(torch.tensor(0.0)) + s(torch.tensor(2.0))) / 2))
    assert p_neutral == pytest.approx(float((s(torch.tensor(1.0)) + s(torch.tensor(0.0))) / 2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_resume_gives_the_uninterrupted_result(tmp_path, monkeypatch, device):
    """Interrupted inside a step, after that step refreshed the buffer and measured D but before the
    model moved: the resumed run ends with the uninterrupted run's entries and D accuracy curve (on a GPU
    the checkpoint reads onto the CPU and the buffer's latents go back to the model's device)."""
    cs = as_concepts([toy_concepts.concept("circle")], preserve=["square"])
    cfg = {**FAST, "steps": 5}
    full = fade.run(models.load("toy-sd", device=device), cs, fade.FADEConfig(**cfg), progress=False)

    ckpt = tmp_path / "fade.ckpt"
    real_train, real_step = loop.train, fade.Adversary.train_d
    monkeypatch.setattr(loop, "train", lambda *a, **k: real_train(*a, **{**k, "checkpoint_every": 1}))
    calls = []

    def interrupted(self, g):
        calls.append(1)
        if len(calls) == cfg["d_pretrain_steps"] + 3:  # step 2's D step, after its buffer refresh
            raise KeyboardInterrupt
        return real_step(self, g)

    monkeypatch.setattr(fade.Adversary, "train_d", interrupted)
    run = lambda model: fade.run(model, cs, fade.FADEConfig(**cfg, checkpoint=str(ckpt)), progress=False)  # noqa: E731
    assert interrupted_step(run, ckpt, device) == 2
    monkeypatch.setattr(fade.Adversary, "train_d", real_step)
    resumed = fade.run(models.load("toy-sd", device=device), cs, fade.FADEConfig(**cfg, checkpoint=str(ckpt)),
                       progress=False)
    assert resumed.entries.keys() == full.entries.keys()
    for k, (idx, values) in full.entries.items():
        assert torch.equal(resumed.entries[k][0], idx) and torch.equal(resumed.entries[k][1], values)
    assert resumed.report["d_accuracy"] == full.report["d_accuracy"]


@pytest.mark.parametrize("options,needle", [
    ({"t0": 1.0}, "t0"),
    ({"t0": -0.1}, "t0"),
    ({"removal": "pixel"}, "removal"),
    ({"saliency_share": 0}, "saliency_share"),
    ({"saliency_share": 1.5}, "saliency_share"),
    ({"stop_delta": 0.7}, "stop_delta"),
    ({"lambda_pres": -1}, "lambda_pres"),
    ({"d_lr_ratio": 0}, "d_lr_ratio"),
    ({"rollouts": 0}, "rollouts"),
    ({"neutral": "a, b"}, "neutral"),
    ({"steps": 0}, "steps"),
    ({"d_pretrain_steps": 0}, "d_pretrain_steps must be >= 1"),
    ({"t0": 0.95}, "no sampler step on one side"),
])
def test_bad_options(options, needle):
    with pytest.raises(UserError, match=needle):
        fasterase.erase("toy-sd", "circle", method="fade", progress=False, **{**FAST, **options})


def test_lambda_pres_by_concept_type():
    """Unset, lambda_pres is the concepts' type's (the largest of several types); set, the user's."""
    circle, red = toy_concepts.concept("circle"), toy_concepts.concept("red")
    assert (circle.type, red.type) == ("object", "style")
    assert fade.LAMBDA_PRES["object"] != fade.LAMBDA_PRES["style"]
    lam = {name: fade.resolved(fade.FADEConfig(), as_concepts(cs)).lambda_pres
           for name, cs in {"circle": [circle], "red": [red], "both": [red, circle]}.items()}
    assert lam == {"circle": fade.LAMBDA_PRES["object"], "red": fade.LAMBDA_PRES["style"],
                   "both": max(fade.LAMBDA_PRES["object"], fade.LAMBDA_PRES["style"])}
    assert fade.resolved(fade.FADEConfig(lambda_pres=0.0), as_concepts([circle])).lambda_pres == 0.0


def test_the_report_records_the_resolved_lambda():
    result = fasterase.erase("toy-sd", "red", method="fade", progress=False, **FAST)
    assert result.edit.config["lambda_pres"] == result.report["config"]["lambda_pres"] == fade.LAMBDA_PRES["style"]


def test_a_concept_the_model_does_not_draw_is_refused():
    """When D cannot tell the concept's generations from the neutral ones, nothing can be erased: an error,
    not an early stop that reports success."""
    with pytest.raises(UserError, match="no better than chance"):  # P_-c = P_c: each pair is one image twice
        fasterase.erase("toy-sd", "circle", method="fade", progress=False, **{**FAST, "neutral": "circle"})


# --- honest measurement ---------------------------------------------------------------------------

TINY = {
    "uce": {},
    "esd": {"steps": 1, "batch_size": 1, "sample_steps": 2},
    "ant": {"steps": 1, "batch_size": 1, "sample_steps": 2, "saliency_prompts": 1, "saliency_seeds": 1},
    "fade": FAST,
    "trace": {"steps": 1, "batch_size": 1, "rollouts": 1, "sample_steps": 8, "d_pretrain_steps": 30, "d_batch": 16},
}


@pytest.mark.parametrize("method", sorted(fasterase.methods()))
def test_no_method_touches_the_evaluation_detector(method, monkeypatch):
    """Every method erases with the detector's loader and network made unusable."""
    assert set(TINY) == set(fasterase.methods())

    def refuse(*args, **kwargs):
        raise AssertionError("a method loaded or called the evaluation's detector")

    monkeypatch.setattr(detector, "load", refuse)
    monkeypatch.setattr(detector.Detector, "forward", refuse)
    monkeypatch.setattr(detector.Detector, "__init__", refuse)
    fasterase.erase("toy-sd", "circle", method=method, progress=False, **TINY[method])


def test_a_neutral_word_the_tokenizer_does_not_know_is_refused_before_any_work(monkeypatch):
    """neutral="dog" on the toy world (its vocabulary has no dog) trained on <unk>; it is named instead."""
    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, ["circle"], None)
    monkeypatch.setattr(fade.Adversary, "refresh", lambda *a: pytest.fail("the run started"))
    with pytest.raises(UserError, match="FADE option neutral 'a dog': the model's tokenizer does not know 'dog'"):
        fade.run(model, cs, fade.FADEConfig(**FAST, neutral="a dog"), progress=False)
