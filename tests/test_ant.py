"""ANT: the eq. (3) loss, the t' split, saliency masks, masked training, LoRA fusion, resume, errors."""
import json

import pytest
import torch

import fasterase
from fasterase import models
from fasterase.cli import main
from fasterase.concepts import Concept
from fasterase.edit import Edit
from fasterase.errors import UserError
from fasterase.methods import ant, esd
from fasterase.training import params, saliency, sampling
from fasterase.training.closed_form import fuse_lora_deltas
from fasterase.training.losses import trajectory_aware_loss
from edit_testing import moved_entries

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
    """Early (high noise) points keep the condition direction, late points reverse it."""
    model = models.load(name)
    assert model.sampling_taus(10)[0] > 0.9  # step 0 is the noisiest: "early" is sigma / t near 1 for both
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


def test_taus_are_drawn_uniformly_from_each_interval():
    """Eq. (3): t1 ~ U(t', 1], t2 ~ U(0, t'], continuously, not from a sampler grid."""
    g = torch.Generator().manual_seed(0)
    draws = [ant.draw_taus(0.86, True, g) for _ in range(4000)]
    assert all(e1 and not e2 for (_, e1), (_, e2) in draws)
    for k, (lo, hi) in enumerate([(0.86, 1.0), (0.0, 0.86)]):
        taus = torch.tensor([d[k][0] for d in draws], dtype=torch.float64)
        assert lo < taus.min() and taus.max() <= hi and len(set(taus.tolist())) == len(taus)
        assert taus.min() < lo + 0.01 * (hi - lo) and taus.max() > hi - 0.01 * (hi - lo)  # the whole interval
        counts = torch.histc(taus, bins=10, min=lo, max=hi)
        assert counts.min() > 0.8 * len(taus) / 10  # uniform
    alone = [ant.draw_taus(0.86, False, g) for _ in range(1000)]
    assert all(len(d) == 1 and not d[0][1] and 0 < d[0][0] <= 1 for d in alone)
    assert min(d[0][0] for d in alone) < 0.05 and max(d[0][0] for d in alone) > 0.95


@pytest.mark.parametrize("name", MODELS)
def test_x_t_is_at_the_drawn_tau(name):
    """States between grid steps are the grid state moved by one DDIM (SD) / Euler (FLUX) step;
    on a grid step they are the trajectory's own."""
    model = models.load(name)
    cond = model.encode(["a red circle", "a blue circle"])
    grid = model.sampling_taus(10)
    tau = (grid[3] + grid[4]) / 2 + 0.01
    on, between = sampling.states(model, cond, 10, [grid[5], tau], 3.0, torch.Generator().manual_seed(1))
    x5, x3 = model.trajectory(cond, 10, [5, 3], 3.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(on, x5, rtol=0, atol=1e-5)
    s = torch.full((2,), grid[3])
    with torch.no_grad():
        out = model.guided(x3, s, cond, 3.0)
    if name == "toy-flux":  # Euler along the velocity
        expect = x3 + (tau - grid[3]) * out
    else:  # DDIM (eta 0) along the predicted noise
        a = model.alphas_cumprod
        a_s, a_t = a[round(grid[3] * 1000)], a[round(tau * 1000)]
        x0 = (x3 - (1 - a_s).sqrt() * out) / a_s.sqrt()
        expect = a_t.sqrt() * x0 + (1 - a_t).sqrt() * out
    torch.testing.assert_close(between, expect, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_loss_gets_x_t_at_the_drawn_taus(name, monkeypatch):
    model = models.load(name)
    seen = []
    monkeypatch.setattr(ant, "ant_loss", lambda m, cond, points, *a: seen.append(points) or torch.zeros(()))
    cfg = ant.ANTConfig(sample_steps=6)
    hp = cfg.resolved(Concept("circle"))
    cond = model.encode(["a circle", "a photo of a circle"])
    ant.trajectory_loss(model, hp, cfg, torch.no_grad)(cond, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    drawn = ant.draw_taus(hp["t_split"], True, g)
    xs = sampling.states(model, cond, 6, [t for t, _ in drawn], cfg.guidance, g)
    assert [(tau, early) for _, tau, early in seen[0]] == drawn
    assert all(torch.equal(x, p[0]) for x, p in zip(xs, seen[0]))
    assert not {t for t, _ in drawn} & set(model.sampling_taus(6))


@pytest.mark.parametrize("name", MODELS)
def test_unconditional_terms_move_the_weights(name):
    """lambda2 / lambda3 change the gradient once the edited model differs from the teacher."""
    model = models.load(name)
    net = model.network
    names = [n for n, p in net.named_parameters() if p.dim() == 2][:6]
    change = params.CompactDelta(net, dict.fromkeys(names))
    with torch.no_grad():
        for n in names:
            v = change.values[n]
            v.add_(0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)))
    change.sync()
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
    assert isinstance(err.value, UserError)  # the user's threshold: one line, exit 2
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
    concept, cfg = Concept("circle"), ant.ANTConfig(**FAST)
    edit = ant.run(model, fasterase.concepts.as_concepts([concept]), cfg, progress=False)
    assert all(torch.equal(before[k], v) for k, v in state(model).items())  # run() leaves the model as it was
    report = edit.report
    assert 0 < report["saliency_selected"] == report["trained_entries"] < report["saliency_candidates"]
    mask, meta = ant.concept_saliency(model, concept, cfg.resolved(concept), cfg, progress=False)
    assert meta["saliency_cached"] and set(edit.entries) | set(edit.weights) == {k for k, i in mask.items() if i.numel()}
    assert edit.entries and edit.weights  # small tensors mostly selected are stored whole, the rest as entries
    edit.apply(model)
    assert moved_entries(before, state(model), edit, selected=mask) > 0
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


def test_saliency_key_covers_the_image_size_noise_schedule_and_text_encoders():
    """A map is only reused by the model setting it was computed for: another resolution, another
    prediction type (a v-prediction checkpoint of the same UNet) or another text encoder is another key."""
    from diffusers import DDIMScheduler

    concept = Concept("circle")
    cfg = ant.ANTConfig(**FAST)
    hp = cfg.resolved(concept)
    model = models.load("toy-sd")
    keys = [ant._saliency_key(model, concept, hp, cfg)]
    assert ant._saliency_key(models.load("toy-sd"), concept, hp, cfg) == keys[0]  # the same setting: the same key
    model.set_resolution((model.height + 8, model.width))
    keys.append(ant._saliency_key(model, concept, hp, cfg))
    pipe = models.load("toy-sd").pipeline
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    keys.append(ant._saliency_key(models.load(pipe), concept, hp, cfg))
    pipe = models.load("toy-sd").pipeline
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).mul_(1.01)
    keys.append(ant._saliency_key(models.load(pipe), concept, hp, cfg))
    assert len(set(keys)) == 4


def test_saliency_prompts_are_encoded_at_once(monkeypatch):
    """Offloaded text encoders come to the GPU for each encode() that meets new prompts: the maps' prompts
    are encoded in one call, not one a map."""
    model = models.load("toy-sd")
    concept = fasterase.concepts.as_concepts([Concept("circle")]).concepts[0]
    cfg = ant.ANTConfig(**{**FAST, "saliency_prompts": 3, "saliency_threshold": 1.5})
    calls, encode = [], model._encode
    monkeypatch.setattr(model, "_encode", lambda prompts: calls.append(list(prompts)) or encode(prompts))
    ant.concept_saliency(model, concept, cfg.resolved(concept), cfg, progress=False)
    assert [len(c) for c in calls] == [4]  # and the empty prompt of the guided rollouts


def test_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    """The interrupted call computes its saliency map, the resuming one reads it from the cache (the file's
    order of tensors, not the network's): the same run, resumed."""
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
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "another cache"))  # the map made afresh, then cached
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


@pytest.mark.parametrize("name", MODELS)
def test_word_rows_are_the_words_tokens(name):
    model = models.load(name)
    prompts = ["a photo of a red circle", "circle", "a circle beside a square"]
    rows = model.word_rows(prompts, ["circle"])
    ids = model.text_tokenizer(prompts).input_ids
    tokens = [model.text_tokenizer.convert_ids_to_tokens(i) for i in ids]
    assert [[t[r] for r in rs] for t, rs in zip(tokens, rows)] == [["circle"]] * 3
    assert rows == [[6], [1], [2]]  # after <s>: the toy tokenizers of both models are word-level
    assert model.word_rows(["a red circle beside a blue square"], ["square", "circle"]) == [[3, 7]]
    with pytest.raises(UserError, match="none of \\['circle'\\].*'a square'"):
        model.word_rows(["a square"], ["circle"])


@pytest.mark.parametrize("name", MODELS)
def test_fusion_solves_over_every_token_row(name, monkeypatch):
    """Eq. (7)'s e^f are every token row of each concept's augmented prompts (begin token, template
    words and padding too, as MACE fuses), e^p every row of the preserved prompts; the pooled-text
    embedder (FLUX) reads one row per prompt."""
    model = models.load(name)
    concepts = fasterase.concepts.as_concepts([Concept("circle", attributes=("red", "blue")), Concept("square")],
                                              preserve=["triangle"])
    calls = {}
    real = ant.fuse_lora_deltas
    monkeypatch.setattr(ant, "fuse_lora_deltas", lambda w, erase, deltas, keep, *a: calls.setdefault(
        len(calls), (erase, keep)) and real(w, erase, deltas, keep, *a))
    ant.run(model, concepts, ant.ANTConfig(steps=1, batch_size=1, sample_steps=4), progress=False)
    erase, keep = calls[0]  # the first fused projection: SD's first attn2.to_k, FLUX's context_embedder
    projection = ant._fusion_projections(model)[0]
    for concept, rows in zip(concepts, erase):
        inputs = model.kv_inputs(model.encode(concept.prompts(augment=True)))[projection.name]
        assert inputs.dim() == 3 and inputs.shape[1] > 1
        torch.testing.assert_close(rows, inputs.reshape(-1, inputs.shape[-1]).float())
    preserve = concepts.preserve_prompts()
    inputs = model.kv_inputs(model.encode(preserve))[projection.name]
    torch.testing.assert_close(keep, inputs.reshape(-1, inputs.shape[-1]).float())
    if name == "toy-flux":  # the pooled-text embedder: one row per prompt
        pooled_erase, pooled_keep = calls[1]
        assert [len(r) for r in pooled_erase] == [len(c.prompts(augment=True)) for c in concepts]
        assert len(pooled_keep) == len(preserve)


# --- the API and the command line --------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_cli_erase_ant_saves_and_loads(name, tmp_path, capsys):
    out = tmp_path / "edit"
    sets = [a for k, v in FAST.items() for a in ("--set", f"{k}={v}")]
    code = main(["erase", "--model", name, "--concept", "circle", "--method", "ant", *sets, "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    edit = Edit.load(out)
    assert edit.method == "ant" and edit.entries
    model = models.load(name)
    before = state(model)
    fasterase.load(model.pipeline, out)
    changed = [k for k, v in state(model).items() if not torch.equal(before[k], v)]
    assert changed and set(changed) <= set(edit.entries) | set(edit.weights)
    assert json.loads(json.dumps(edit.report))["trained_entries"] > 0


@pytest.mark.parametrize("options,needle", [
    ({"t_split": 0.0}, "strictly between 0"),
    ({"t_split": 1.0}, "strictly between 0"),
    ({"t_split": 1.5}, "strictly between 0"),
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


@pytest.mark.parametrize("concepts", [["circle"], ["circle", "square"]])
def test_a_checkpoint_of_another_run_is_refused_before_the_saliency_map(tmp_path, monkeypatch, concepts):
    """An ESD run's checkpoint named for ANT is refused before ANT computes its map (minutes on FLUX), not
    after; with several concepts, every concept's file is checked before the first trains."""
    from fasterase.training import loop

    model = models.load("toy-sd")
    cs = fasterase.api._resolve_concepts(model, concepts, None)
    ckpt = tmp_path / "esd.ckpt"
    for k in ("", ".0", ".1"):
        torch.save({"fasterase_checkpoint": loop.FORMAT, "run": loop.identity("esd", cs, esd.ESDConfig(), "x", model.setting())},
                   f"{ckpt}{k}")
    monkeypatch.setattr(ant, "concept_saliency", lambda *a, **k: pytest.fail("the saliency map was computed"))
    monkeypatch.setattr(params, "add_lora", lambda *a, **k: pytest.fail("training began"))
    with pytest.raises(UserError, match=r"belongs to another run: its run.method \('esd' there, 'ant' here\); "
                                        r"\d+ more that follow from it differ from this run's; use another"):
        ant.run(model, cs, ant.ANTConfig(checkpoint=str(ckpt)), progress=False)


def test_an_unusable_saliency_cache_is_refused_before_the_maps(tmp_path, monkeypatch):
    """FASTERASE_CACHE naming a file was found only when the computed map was saved (minutes on a real model)."""
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "file"))
    monkeypatch.setattr(ant, "trajectory_loss", lambda *a, **k: pytest.fail("a map was computed"))
    model = models.load("toy-sd")
    concept, cfg = Concept("circle"), ant.ANTConfig(**FAST)
    with pytest.raises(UserError, match=r"saliency map cache .* is a file, not a folder; set FASTERASE_CACHE"):
        ant.concept_saliency(model, concept, cfg.resolved(concept), cfg, progress=False)
