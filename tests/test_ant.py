"""ANT: the eq. (3) loss, the t' split, saliency masks, masked training, LoRA fusion, resume, errors."""
import json

import pytest
import torch

import fasterase
from fasterase import models
from fasterase.cli import main
from fasterase.concepts import Concept
from fasterase.edit import Edit
from fasterase.methods import ant
from fasterase.training import params, saliency
from fasterase.training.closed_form import fuse_lora_deltas
from fasterase.training.losses import trajectory_aware_loss

MODELS = ["toy-sd", "toy-flux"]
FAST = {"steps": 2, "batch_size": 2, "sample_steps": 10, "saliency_prompts": 2, "saliency_seeds": 1}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "cache"))


def state(model):
    return {k: v.detach().clone() for k, v in model.network.state_dict().items()}


# --- the loss ------------------------------------------------------------------------------------

def direct_eq3(pc, pu, tc, tu, early, eta, l1, l2, l3):
    """Eq. (3) written out: expectations as means over the early / late samples."""
    def mse(a, b):
        return (a - b).pow(2).flatten(1).mean(1)
    e, late = early, ~early
    return (mse(pc[e], tu[e] + eta * (tc[e] - tu[e])).mean()
            + l1 * mse(pc[late], tu[late] - eta * (tc[late] - tu[late])).mean()
            + l2 * mse(pu[e], tu[e]).mean() + l3 * mse(pu[late], tu[late]).mean())


@pytest.mark.parametrize("b,n", [(2, 1), (6, 255), (4, 257)])
def test_loss_matches_eq3_and_its_gradients(b, n):
    g = torch.Generator().manual_seed(b * n)
    pc, pu, tc, tu = (torch.randn(b, n, generator=g, dtype=torch.float64) for _ in range(4))
    early = torch.arange(b) < b // 2
    pc.requires_grad_(True)
    pu.requires_grad_(True)
    args = (early, 1.7, 0.4, 0.5, 0.2)
    ours = trajectory_aware_loss(pc.float(), pu.float(), tc.float(), tu.float(), *args)
    ref = direct_eq3(pc, pu, tc, tu, *args)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    gc, gu = torch.autograd.grad(ours, [pc, pu])
    rc, ru = torch.autograd.grad(ref, [pc, pu])
    torch.testing.assert_close(gc, rc, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gu, ru, rtol=1e-4, atol=1e-7)  # the unconditional terms carry gradient
    assert gu.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_split_direction(name):
    """Early (high noise) steps keep the condition direction, late steps reverse it."""
    model = models.load(name)
    early, late = ant.split_steps(model, 0.5, 10)
    taus = model.sampling_taus(10)
    assert taus[0] > 0.9  # step 0 is the noisiest: "early" is sigma / t near 1 for both models
    assert early and late and max(early) < min(late)
    assert all(taus[i] > 0.5 for i in early) and all(taus[i] <= 0.5 for i in late)
    cond = model.encode(["a red circle"] * 2)
    x = model.noise(2, torch.Generator().manual_seed(0))
    hp = {"lambda1": 0.7, "lambda2": 0.5, "lambda3": 0.5}
    with torch.no_grad():
        c, u = model.predict(torch.cat([x, x]), torch.full((4,), 0.3), type(cond).cat([cond, model.uncond.repeat(2)])).chunk(2)
        # at the original weights the student is the teacher: preserving costs nothing ...
        keep = ant.ant_loss(model, cond, [(x, 0.3, True)], hp, 1.0, torch.no_grad)
        # ... and reversing costs lambda1 * (1 + eta)^2 |c - u|^2
        rev = ant.ant_loss(model, cond, [(x, 0.3, False)], hp, 1.0, torch.no_grad)
    assert keep.item() == pytest.approx(0.0, abs=1e-10)
    assert rev.item() == pytest.approx(0.7 * 4 * (c - u).pow(2).mean().item(), rel=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_each_step_draws_one_early_and_one_late_point(name, monkeypatch):
    model = models.load(name)
    seen = []
    monkeypatch.setattr(ant, "ant_loss", lambda m, cond, points, *a: seen.append(points) or torch.zeros(()))
    cfg = ant.ANTConfig(sample_steps=8)
    hp = cfg.resolved(Concept("circle"))
    loss = ant.trajectory_loss(model, hp, cfg, torch.no_grad)
    for s in range(6):
        loss(model.encode(["a circle"]), torch.Generator().manual_seed(s))
    for (x1, tau1, early1), (x2, tau2, early2) in seen:
        assert early1 and not early2 and tau1 > hp["t_split"] >= tau2
    without = ant.trajectory_loss(model, hp, ant.ANTConfig(sample_steps=8, split=False), torch.no_grad)
    seen.clear()
    without(model.encode(["a circle"]), torch.Generator().manual_seed(0))
    assert len(seen[0]) == 1 and seen[0][0][2] is False


@pytest.mark.parametrize("name", MODELS)
def test_unconditional_terms_move_the_weights(name):
    """lambda2 / lambda3 change the gradient once the edited model differs from the teacher."""
    model = models.load(name)
    net = model.network
    names = [n for n, p in net.named_parameters() if p.dim() == 2][:6]
    change = params.MaskedChange(net, {n: torch.arange(net.get_parameter(n).numel(), dtype=torch.int32)
                                       for n in names})
    with torch.no_grad():
        for n in names:
            p = net.get_parameter(n)
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cond = model.encode(["a red circle"])
    x = model.noise(1, torch.Generator().manual_seed(0))
    grads = []
    for l23 in (0.0, 1.0):
        hp = {"lambda1": 1.0, "lambda2": l23, "lambda3": l23}
        loss = ant.ant_loss(model, cond, [(x, 0.9, True), (x, 0.3, False)], hp, 1.0, change.off)
        grads.append(torch.autograd.grad(loss, [net.get_parameter(n) for n in names]))
    assert any(not torch.allclose(a, b) for a, b in zip(*grads))
    change.restore()


# --- saliency masks -------------------------------------------------------------------------------

def test_mask_is_the_intersection_of_thresholded_maps():
    g = torch.Generator().manual_seed(0)
    maps = [{"a": torch.randn(33, 7, generator=g), "b": torch.randn(257, generator=g)} for _ in range(5)]
    score = saliency.SaliencyScore()
    for m in maps:
        score.add(m)
    gamma = 0.8
    expect = {}
    for name in ("a", "b"):
        keep = torch.ones(maps[0][name].numel(), dtype=torch.bool)
        for m in maps:
            rms = torch.cat([t.reshape(-1) for t in m.values()]).pow(2).mean().sqrt()
            keep &= m[name].reshape(-1).abs() >= gamma * rms
        expect[name] = torch.nonzero(keep).reshape(-1).to(torch.int32)
    got = score.mask(gamma)
    for name in ("a", "b"):
        assert torch.equal(got.get(name, torch.zeros(0, dtype=torch.int32)), expect[name])
    assert saliency.selected(got) == sum(e.numel() for e in expect.values()) > 0


def test_mask_keeps_the_largest_gradients():
    grads = torch.tensor([0.01, -5.0, 0.02, 4.0, 0.0, -0.03])
    score = saliency.SaliencyScore()
    score.add({"w": grads})
    score.add({"w": grads * torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 50.0])})
    idx = score.mask(1.0)["w"].tolist()
    assert idx == [1, 3]  # large in both maps; -0.03 is large only in the second


@pytest.mark.parametrize("sizes,k", [([1], 1), ([255, 257], 3), ([4097, 1], 4098), ([17, 300], 100)])
def test_kth_largest_exact(sizes, k):
    g = torch.Generator().manual_seed(k)
    ts = [torch.randn(s, generator=g).abs() for s in sizes]
    ts[-1][:1] = ts[0].reshape(-1)[0]  # a tie
    assert saliency.kth_largest(ts, k) == torch.cat(ts).sort(descending=True).values[k - 1].item()
    with pytest.raises(ValueError, match="k must be"):
        saliency.kth_largest(ts, 0)


def test_empty_mask_says_what_would_work():
    score = saliency.SaliencyScore()
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        score.add({"w": torch.randn(5000, generator=g)})
    with pytest.raises(saliency.EmptySaliencyMap, match="empty") as err:
        saliency.check_not_empty(score, 50.0, "saliency_threshold")
    suggested = float(str(err.value).split("saliency_threshold=")[-1].split(" ")[0])
    assert 1 <= saliency.selected(saliency.check_not_empty(score, suggested, "saliency_threshold")) <= 10


def test_mask_storage_round_trip(tmp_path):
    mask = {"a.weight": torch.tensor([0, 5, 9], dtype=torch.int32)}
    saliency.save_mask(tmp_path / "m.safetensors", mask, {"selected": 3})
    back, meta = saliency.load_mask(tmp_path / "m.safetensors")
    assert torch.equal(back["a.weight"], mask["a.weight"]) and meta == {"selected": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# --- masked training --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_only_salient_entries_change(name):
    model = models.load(name)
    before = state(model)
    edit = ant.run(model, fasterase.concepts.as_concepts([Concept("circle")]), ant.ANTConfig(**FAST), progress=False)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())  # run() leaves the model as it was
    report = edit.report
    assert 0 < report["saliency_selected"] == report["trained_entries"] < report["saliency_candidates"]
    edit.apply(model)
    after = state(model)
    moved = 0
    for k in before:
        changed = (before[k] != after[k]).reshape(-1)
        if k not in edit.entries:
            assert not changed.any(), k  # bit-identical
            continue
        outside = torch.ones_like(changed)
        outside[edit.entries[k][0].long()] = False
        assert not (changed & outside).any(), k  # only M* entries move
        moved += int(changed.sum())
    assert moved > 0
    edit.remove(model)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())


@pytest.mark.parametrize("names", [["circle"], ["circle", "square"]])
def test_trains_on_the_concepts_own_prompts_and_augments_only_the_saliency_maps(names, monkeypatch):
    model = models.load("toy-sd")
    concepts = [Concept(n, attributes=("red", "blue")) for n in names]
    encoded, trained = [], []
    encode, make = model.encode, ant._training_loss
    monkeypatch.setattr(model, "encode", lambda prompts: encoded.extend(prompts) or encode(prompts))
    monkeypatch.setattr(ant, "_training_loss",
                        lambda m, prompts, *a, **k: trained.append(prompts) or make(m, prompts, *a, **k))
    cfg = ant.ANTConfig(**{**FAST, "saliency_prompts": 6})
    ant.run(model, fasterase.concepts.as_concepts(concepts), cfg, progress=False)
    assert trained == [c.prompts() for c in concepts]
    if len(concepts) == 1:  # M* came from augmented prompts ("a photo of a red circle")
        assert set(encoded) & (set(concepts[0].prompts(augment=True)) - set(concepts[0].prompts()))


def test_saliency_map_is_cached(tmp_path):
    model = models.load("toy-sd")
    cs = fasterase.concepts.as_concepts([Concept("circle")])
    cfg = ant.ANTConfig(**FAST)
    hp = cfg.resolved(cs.concepts[0])
    first, meta = ant.concept_saliency(model, cs.concepts[0], hp, cfg, progress=False)
    again, meta2 = ant.concept_saliency(model, cs.concepts[0], hp, cfg, progress=False)
    assert not meta["saliency_cached"] and meta2["saliency_cached"]
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert all(v.dtype == torch.int32 for v in again.values())
    files = list(saliency.cache_dir().glob("*.safetensors"))
    assert len(files) == 1
    other = ant.ANTConfig(**{**FAST, "saliency_threshold": 2.0})
    ant.concept_saliency(model, cs.concepts[0], other.resolved(cs.concepts[0]), other, progress=False)
    assert len(list(saliency.cache_dir().glob("*.safetensors"))) == 2  # settings are part of the key


def test_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    cs = fasterase.concepts.as_concepts([Concept("circle")])
    opts = {**FAST, "steps": 4}
    full = ant.run(models.load("toy-sd"), cs, ant.ANTConfig(**opts), progress=False)

    ckpt = tmp_path / "ant.ckpt"
    real, calls = ant.ant_loss, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(ant, "ant_loss", interrupted)
    model = models.load("toy-sd")
    before = state(model)
    with pytest.raises(KeyboardInterrupt):
        ant.run(model, cs, ant.ANTConfig(**opts, checkpoint=str(ckpt)), progress=False)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())
    monkeypatch.setattr(ant, "ant_loss", real)
    resumed = ant.run(models.load("toy-sd"), cs, ant.ANTConfig(**opts, checkpoint=str(ckpt)), progress=False)
    assert resumed.entries.keys() == full.entries.keys()
    for k, (idx, values) in full.entries.items():
        assert torch.equal(resumed.entries[k][0], idx) and torch.equal(resumed.entries[k][1], values)


# --- several concepts -------------------------------------------------------------------------------

def test_fusion_is_the_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    out, d_in = 7, 5
    w = torch.randn(out, d_in, generator=g, dtype=torch.float64)
    es = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for n in (3, 4)]
    ds = [0.3 * torch.randn(out, d_in, generator=g, dtype=torch.float64) for _ in es]
    p = torch.randn(6, d_in, generator=g, dtype=torch.float64)
    beta, lam = 0.7, 0.2
    # stack every term of eq. (7) (plus lam |W* - W|^2) as rows of one least-squares problem in W*^T
    a = torch.cat(es + [beta ** 0.5 * p, lam ** 0.5 * torch.eye(d_in, dtype=torch.float64)])
    b = torch.cat([e @ (w + d).t() for e, d in zip(es, ds)] + [beta ** 0.5 * p @ w.t(), lam ** 0.5 * w.t()])
    expect = torch.linalg.lstsq(a, b).solution.t()
    got = fuse_lora_deltas(w.float(), [e.float() for e in es], [d.float() for d in ds], p.float(), beta, lam)
    torch.testing.assert_close(got.double(), expect, rtol=1e-4, atol=1e-4)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("name", MODELS)
def test_two_concepts_fuse_into_the_text_projections(name, tmp_path):
    pipe = models.load(name).pipeline
    result = fasterase.erase(pipe, ["circle", "square"], method="ant", progress=False, steps=2, batch_size=2,
                             sample_steps=10)
    edit = result.edit
    fused = {f"{p.name}.weight" for p in ant._fusion_projections(result.model)}
    assert set(edit.weights) == fused and not edit.lora and not edit.entries
    assert "fasterase" not in getattr(result.model.network, "peft_config", {})  # the LoRAs are gone
    edit.save(tmp_path / "e")
    back = Edit.load(tmp_path / "e")
    assert back.weights.keys() == edit.weights.keys()
    assert all(torch.equal(back.weights[k], edit.weights[k]) for k in edit.weights)


# --- the API and the command line --------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_cli_erase_ant_saves_and_loads(name, tmp_path, capsys):
    out = tmp_path / "edit"
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    code = main(["erase", "--model", name, "--concept", "circle", "--method", "ant", *sets, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    edit = Edit.load(out)
    assert edit.method == "ant" and edit.entries and not edit.weights
    model = models.load(name)
    before = state(model)
    fasterase.load(model.pipeline, out)
    changed = [k for k, v in state(model).items() if not torch.equal(before[k], v)]
    assert changed and set(changed) <= set(edit.entries)
    assert json.loads(json.dumps(edit.report))["trained_entries"] > 0


@pytest.mark.parametrize("options,needle", [
    ({"t_split": 0.0}, "strictly between 0"),
    ({"t_split": 1.0}, "strictly between 0"),
    ({"t_split": 1.5}, "strictly between 0"),
    ({"t_split": 0.99, "sample_steps": 6}, "choose t_split in between"),
    ({"saliency_threshold": 0}, "must be > 0"),
    ({"lambda1": -1}, "lambda1"),
    ({"steps": 0}, "steps"),
])
def test_bad_options(options, needle):
    pipe = models.load("toy-sd").pipeline
    before = state(models.load(pipe))
    with pytest.raises(ValueError, match=needle):
        fasterase.erase(pipe, "circle", method="ant", progress=False, **{**FAST, **options})
    assert all(torch.equal(before[k], v) for k, v in state(models.load(pipe)).items())


def test_threshold_that_empties_the_map():
    with pytest.raises(ValueError, match=r"empty.*saliency_threshold=[0-9.]+ keeps about 0.1%"):
        fasterase.erase("toy-sd", "circle", method="ant", progress=False, **{**FAST, "saliency_threshold": 1e6})


def test_unknown_type_and_duplicates():
    with pytest.raises(ValueError, match="unknown concept type 'animal'"):
        fasterase.erase("toy-sd", Concept("circle", type="animal"), method="ant", progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        fasterase.erase("toy-sd", ["circle", "circle"], method="ant", progress=False)


def test_per_type_defaults_follow_table_6():
    cfg = ant.ANTConfig()
    assert cfg.resolved(Concept("x", type="nudity")) == dict(lr=5e-4, steps=250, lambda1=1.0, lambda2=0.5,
                                                             lambda3=0.5, t_split=0.86)
    assert cfg.resolved(Concept("x", type="celebrity"))["t_split"] == 0.8
    assert cfg.resolved(Concept("x", type="style"))["t_split"] == 0.94
    assert ant.ANTConfig(lambda1=0.3).resolved(Concept("x", type="style"))["lambda1"] == 0.3
    # objects (no Table 6 row): the nudity row with four times the steps and a heavier late uncond term
    assert cfg.resolved(Concept("x", type="object")) == dict(lr=5e-4, steps=1000, lambda1=1.0, lambda2=0.5,
                                                             lambda3=3.0, t_split=0.86)
