"""Real-size readiness (issue #18): device and dtype options, fp32 trainables over a half-precision
base, compact deltas, text projections' inputs read from the encoded prompts, gradient
checkpointing, resolution, and folders loading in their own dtype."""
import pytest
import torch
from diffusers import DiffusionPipeline

import fasterase
from fasterase import cli, models
from fasterase.edit import Edit
from fasterase.errors import UserError
from fasterase.methods import ant, fade
from fasterase.optim import SalientAdamW
from fasterase.training import params

FAST = {"esd": {"steps": 2, "batch_size": 2, "sample_steps": 4},
        "ant": {"steps": 2, "batch_size": 2, "sample_steps": 10, "saliency_prompts": 2, "saliency_seeds": 1},
        "uce": {},
        "fade": {"steps": 2, "batch_size": 2, "rollouts": 4, "refresh_every": 2, "sample_steps": 6,
                 "d_pretrain_steps": 30, "d_batch": 16, "d_steps": 1, "saliency_samples": 2},
        "trace": {"steps": 2, "batch_size": 2, "rollouts": 2, "refresh_every": 2, "sample_steps": 8,
                  "d_pretrain_steps": 30, "d_batch": 16}}


@pytest.mark.parametrize("device, needle", [("meta", "cpu or cuda"), ("gpu!", "not a device name"),
                                            ("cuda", "no CUDA GPU")])
def test_bad_device_is_refused_before_any_work(device, needle, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_load", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match=needle):
        fasterase.erase("toy-sd", "circle", method="esd", device=device)


@pytest.mark.parametrize("dtype", ["int8", "fp8", torch.int32, 16])
def test_bad_dtype_is_refused_before_any_work(dtype, monkeypatch):
    monkeypatch.setattr(models, "_load", lambda *a: pytest.fail("a model was loaded"))
    with pytest.raises(UserError, match="valid: fp32, bf16, fp16"):
        fasterase.erase("toy-sd", "circle", method="esd", dtype=dtype)


def test_dtype_names():
    assert models.resolve_dtype("BF16") is torch.bfloat16 and models.resolve_dtype("float16") is torch.float16
    assert models.resolve_dtype(None) is None and models.resolve_device(None).type in ("cpu", "cuda")


@pytest.mark.parametrize("method", ["esd", "ant"])
@pytest.mark.parametrize("name, dtype", [("toy-sd", "bf16"), ("toy-sd", "fp16"), ("toy-flux", "bf16"),
                                         ("toy-flux", "fp16")])
def test_half_precision_pipelines_train_in_fp32(name, dtype, method, monkeypatch):
    """The frozen base stays in the asked dtype; what the optimizer steps is fp32; the loss is finite;
    the edit changes weights, applies, and the pipeline still draws finite images."""
    stepped = []
    for cls in (torch.optim.AdamW, SalientAdamW):
        real = cls.step

        def spy(self, *a, real=real, **k):
            stepped.extend(p.dtype for g in self.param_groups for p in g["params"])
            return real(self, *a, **k)

        monkeypatch.setattr(cls, "step", spy)
    result = fasterase.erase(name, "circle", method=method, dtype=dtype, progress=False, **FAST[method])
    want = models.resolve_dtype(dtype)
    assert result.report["dtype"] == str(want).removeprefix("torch.")
    assert {p.dtype for n, p in result.model.network.named_parameters() if "lora" not in n} == {want}
    assert stepped and set(stepped) == {torch.float32}
    assert torch.isfinite(torch.tensor(result.report["last_loss"]))
    images = result.model.generate(["a red square"], seed=0)
    assert torch.isfinite(images).all()


@pytest.mark.parametrize("method", ["uce", "fade", "trace"])
@pytest.mark.parametrize("name, dtype", [("toy-sd", "bf16"), ("toy-flux", "fp16")])
def test_every_method_runs_in_half_precision(name, dtype, method):
    result = fasterase.erase(name, "circle", method=method, dtype=dtype, progress=False, **FAST[method])
    want = models.resolve_dtype(dtype)
    assert {p.dtype for n, p in result.model.network.named_parameters() if "lora" not in n} == {want}
    assert torch.isfinite(torch.tensor(result.report.get("last_loss", 0.0)))
    assert torch.isfinite(result.model.generate(["a red square"], seed=0)).all()


def test_fade_saliency_sums_overflowing_fp16_are_a_clear_error(monkeypatch):
    """FADE sums |gradient| in the parameters' dtype: in fp16 a sum past 65504 is inf, which would rank
    wrongly; it stops and says which dtypes hold it."""
    def huge(loss, tensors, visit, retain_graph=False, network=None):
        for name, p in tensors.items():
            visit(name, torch.full_like(p, 6e4))

    monkeypatch.setattr(fade.saliency, "visit_gradients", huge)
    with pytest.raises(FloatingPointError, match="not finite; run the model in bf16 or fp32"):
        fasterase.erase("toy-flux", "circle", method="fade", dtype="fp16", progress=False, **FAST["fade"])


def test_a_cpu_run_reports_its_rss_even_beside_a_gpu(monkeypatch):
    """The report's peak is the run's own device's: a CPU run on a machine with a GPU reads the process's
    RSS, not that GPU's counter."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: pytest.fail("read a GPU's counter"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: pytest.fail("reset a GPU's counter"))
    result = fasterase.erase("toy-sd", "circle", method="uce", device="cpu", progress=False)
    assert result.report["peak_process_rss_mb"] > 0 and "peak_cuda_mb" not in result.report


def test_fp16_pipeline_object_through_the_api():
    """A pipeline passed in keeps its own dtype (the default) and its LoRA trains in fp32."""
    pipe = models.load("toy-sd").pipeline.to(torch.float16)
    result = fasterase.erase(pipe, "circle", method="esd", progress=False, **FAST["esd"])
    assert result.pipeline is pipe and pipe.unet.dtype == torch.float16
    assert all(v.dtype == torch.float32 for v in result.edit.lora.values())


@pytest.mark.parametrize("asked", [{"steps": -1}, {"bogus": 1}, {"preserve": ["circle"]}, {"resolution": 30}])
def test_a_refused_run_leaves_the_pipeline_in_its_dtype(asked):
    """Options, concepts and resolution are checked before the pipeline given is cast."""
    pipe = models.load("toy-sd").pipeline
    with pytest.raises(UserError):
        fasterase.erase(pipe, "circle", method="esd", dtype="bf16", progress=False, **asked)
    assert {p.dtype for p in pipe.unet.parameters()} == {p.dtype for p in pipe.text_encoder.parameters()} == \
        {torch.float32}


@pytest.mark.parametrize("copy", [False, True])
def test_a_pipeline_given_is_cast_once_checked(copy):
    pipe = models.load("toy-sd").pipeline
    result = fasterase.erase(pipe, "circle", method="esd", dtype="bf16", copy=copy, progress=False, **FAST["esd"])
    assert result.model.network.dtype == torch.bfloat16 and result.report["dtype"] == "bfloat16"
    assert (result.pipeline is pipe) != copy and pipe.unet.dtype == (torch.float32 if copy else torch.bfloat16)


# --- compact deltas -------------------------------------------------------------------------------

def _masks(net, share, seed):
    g = torch.Generator().manual_seed(seed)
    names = [n for n, p in net.named_parameters() if p.dim() > 1][:7]
    out = {}
    for n in names:
        keep = torch.rand(net.get_parameter(n).numel(), generator=g) < share
        out[n] = torch.nonzero(keep).reshape(-1).to(torch.int32)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_delta_scales_with_the_selected_entries(dtype):
    """Gradients and optimizer states hold the selected entries only, no whole-weight gradient is
    left behind, untouched entries stay bit-identical, and restore() gives the network back."""
    model = models.load("toy-sd", dtype=dtype)
    net = model.network
    original = {k: v.clone() for k, v in net.state_dict().items()}
    masks = _masks(net, 0.1, 0)
    change = params.CompactDelta(net, masks)
    optimizer = SalientAdamW(change.trainable, lr=1e-2, weight_decay=0.0, state_dtype="8bit", min_8bit_size=1)
    optimizer.register_step_post_hook(lambda *_: change.sync())
    x = model.noise(2, torch.Generator().manual_seed(0))
    cond = model.encode(["a red circle", "a blue square"])
    for _ in range(2):
        optimizer.zero_grad()
        model.predict(x, torch.full((2,), 0.5), cond).square().mean().backward()
        optimizer.step()
    selected = sum(i.numel() for i in masks.values())
    assert all(v.dtype == torch.float32 and v.grad.numel() == masks[n].numel() for n, v in change.values.items())
    assert all(p.grad is None for p in net.parameters())
    # 8-bit moments with an fp32 absmax each per 256-entry block, and a step counter per tensor
    assert optimizer.state_bytes() == sum(2 * i.numel() + 8 * -(-i.numel() // 256) + 4 for i in masks.values())
    assert optimizer.state_bytes() < 3 * selected
    for n, w in net.named_parameters():
        flat, before = w.detach().reshape(-1), original[n].reshape(-1)
        keep = torch.ones_like(flat, dtype=torch.bool)
        if n in masks:
            keep[masks[n].long()] = False
            assert not torch.equal(flat[masks[n].long()], before[masks[n].long()])  # trained, in the network
        assert torch.equal(flat[keep], before[keep])
    with change.off():
        assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())
    change.restore()
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_delta_of_whole_parameters_holds_no_index(dtype):
    """A parameter given as None (the methods' saliency=False) trains exactly as the indices of every
    entry do, without holding them, and comes out as a whole weight of the edit."""
    model = models.load("toy-sd", dtype=dtype)
    net = model.network
    names = [n for n, p in net.named_parameters() if p.dim() == 2][:3]
    every = {n: torch.arange(net.get_parameter(n).numel(), dtype=torch.int32) for n in names}
    x = model.noise(2, torch.Generator().manual_seed(0))
    cond = model.encode(["a red circle", "a blue square"])
    trained = []
    for masks in (every, dict.fromkeys(names)):
        change = params.CompactDelta(net, masks)
        optimizer = SalientAdamW(change.trainable, lr=1e-2, weight_decay=0.0)
        optimizer.register_step_post_hook(lambda *_: change.sync())
        for _ in range(2):
            optimizer.zero_grad()
            model.predict(x, torch.full((2,), 0.5), cond).square().mean().backward()
            optimizer.step()
        trained.append((change.current(), change.edit_parts(change.current()), dict(change.indices)))
        change.restore()
    (indexed, indexed_parts, _), (whole, (weights, entries), indices) = trained
    assert all(torch.equal(indexed[n], whole[n]) for n in names)
    assert not entries and all(i is None for i in indices.values())
    assert all(weights[n].shape == net.get_parameter(n).shape and torch.equal(weights[n].reshape(-1), whole[n])
               for n in names)
    assert indexed_parts[1] == {} and all(torch.equal(indexed_parts[0][n], weights[n]) for n in names)


@pytest.mark.parametrize("dtype, dense", [(torch.float32, 0.5), (torch.bfloat16, 1 / 3)])
def test_an_edit_keeps_a_tensor_whole_where_its_entries_would_take_more_bytes(dtype, dense):
    """Selected entries are stored as (int32 index, value) only while that is smaller than the tensor:
    past `dense` of its entries the edit holds the whole weight, base values with the trained ones in."""
    model = models.load("toy-sd", dtype=dtype)
    net = model.network
    name = next(n for n, p in net.named_parameters() if p.dim() == 2 and p.numel() >= 600)
    n = net.get_parameter(name).numel()
    original = net.get_parameter(name).detach().clone()
    for share, kept_whole in ((dense - 0.05, False), (dense + 0.05, True)):
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:round(share * n)].sort().values
        change = params.CompactDelta(net, {name: idx.to(torch.int32)})
        with torch.no_grad():
            change.values[name].add_(1.0)
        values = change.current()
        change.restore()
        weights, entries = change.edit_parts(values)
        assert (name in weights, name in entries) == (kept_whole, not kept_whole)
        if kept_whole:
            expected = original.reshape(-1).clone()
            expected[idx] = values[name]
            assert torch.equal(weights[name], expected.view(original.shape))
        else:
            assert torch.equal(entries[name][0], idx.to(torch.int32)) and torch.equal(entries[name][1], values[name])
        assert torch.equal(net.get_parameter(name), original)


@pytest.mark.parametrize("method, step", [("ant", "fingerprint"), ("ant", "SalientAdamW"),
                                          ("ant", "_training_loss"), ("fade", "fingerprint"),
                                          ("fade", "SalientAdamW"), ("fade", "fade_loss")])
def test_a_failure_after_the_compact_delta_gives_the_network_back(method, step, monkeypatch):
    """A step between CompactDelta and training that raises leaves no hook, no requires_grad and
    no changed weight behind."""
    module = {"ant": ant, "fade": fade}[method]
    model = models.load("toy-sd")
    net = model.network
    original = {k: v.clone() for k, v in net.state_dict().items()}

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, step, boom)
    concepts = fasterase.api._resolve_concepts(model, "circle", None)
    with pytest.raises(RuntimeError, match="boom"):
        if method == "ant":
            ant._single(model, concepts.concepts[0], ant.ANTConfig(**FAST["ant"], saliency=False), False)
        else:
            fade.run(model, concepts, fade.FADEConfig(**FAST["fade"], saliency=False), False)
    assert not any(w.requires_grad for w in net.parameters())
    assert not any(w._post_accumulate_grad_hooks for w in net.parameters())
    assert all(torch.equal(v, original[k]) for k, v in net.state_dict().items())


def test_compact_delta_keeps_small_updates_over_a_bf16_base():
    """Updates too small for bf16 accumulate in the fp32 masters until they show in the network."""
    net = torch.nn.Linear(64, 64).to(torch.bfloat16)
    with torch.no_grad():
        net.weight.fill_(1.0)
    change = params.CompactDelta(net, {"weight": torch.arange(64 * 64, dtype=torch.int32)})
    optimizer = torch.optim.SGD(change.trainable, lr=1e-3)
    optimizer.register_step_post_hook(lambda *_: change.sync())
    for _ in range(20):  # each step moves every entry by 1e-3, below bf16's spacing at 1.0 (2**-7)
        optimizer.zero_grad()
        net(torch.ones(1, 64, dtype=torch.bfloat16)).sum().mul(-1).backward()
        optimizer.step()
    assert torch.allclose(change.values["weight"], torch.full((64 * 64,), 1.02), atol=1e-4)
    assert torch.equal(net.weight.reshape(-1), change.values["weight"].detach().to(torch.bfloat16))
    assert net.weight.float().mean() > 1.0


# --- text projections' inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_direct_kv_inputs_are_what_a_forward_pass_feeds(name, monkeypatch):
    """Read from the encoded prompts: exactly what one forward pass over all prompts feeds them.
    The others come from forward passes in batches (of two and one here), as one pass would give."""
    model = models.load(name)
    cond = model.encode(["a red circle", "a photo of a blue square", "a star"])
    read = model.direct_kv_inputs(cond)
    assert read and set(read) <= {p.name for p in model.cross_attention_kv()}
    monkeypatch.setattr(type(model), "direct_kv_inputs", lambda self, c: {})
    whole = model.kv_inputs(cond)  # one pass
    assert all(torch.equal(read[k], whole[k]) for k in read)
    monkeypatch.setattr(type(model), "kv_batch", 2)
    batched = model.kv_inputs(cond)
    assert batched.keys() == whole.keys()
    assert all(torch.allclose(batched[k], whole[k], rtol=1e-5, atol=1e-6) for k in whole)


def test_uce_runs_no_network_forward_on_sd(monkeypatch):
    model = models.load("toy-sd")
    monkeypatch.setattr(model, "predict", lambda *a: pytest.fail("UCE ran the network"))
    fasterase.erase(model, "circle", method="uce", progress=False)


# --- memory switches --------------------------------------------------------------------------------

def test_gradient_checkpointing_is_switched_on_while_training(monkeypatch):
    model = models.load("toy-sd")
    seen = []
    real = model.predict

    def spy(*a):
        seen.append((torch.is_grad_enabled(), model.network.is_gradient_checkpointing, model.network.training))
        return real(*a)

    monkeypatch.setattr(model, "predict", spy)
    plain = fasterase.erase(models.load("toy-sd"), "circle", method="esd", progress=False, **FAST["esd"])
    result = fasterase.erase(model, "circle", method="esd", progress=False, gradient_checkpointing=True,
                             **FAST["esd"])
    assert any(grad and ckpt and train for grad, ckpt, train in seen)
    assert not model.network.is_gradient_checkpointing and result.report["gradient_checkpointing"]
    # recomputation changes no value on the CPU
    assert all(torch.equal(plain.edit.lora[k], result.edit.lora[k]) for k in plain.edit.lora)


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_micro_batch_splits_passes_without_a_graph(name):
    """Without a graph, micro_batch rows a network call, the same outputs (fp32: within rounding of the
    batch's own matmuls)."""
    model = models.load(name)
    calls = []
    model.network.register_forward_pre_hook(lambda m, a, kw: calls.append(len((a or [kw["hidden_states"]])[0])),
                                            with_kwargs=True)
    x, tau = model.noise(7, torch.Generator().manual_seed(0)), torch.linspace(0.1, 0.9, 7)
    cond = model.encode([f"a red circle {i}" for i in range(7)])
    with torch.no_grad():
        whole = model.guided(x, tau, cond, 4.0)
        model.micro_batch = 3
        split = model.guided(x, tau, cond, 4.0)
    rows = 7 if model.kind == "flux" and model.guidance_embeds else 14  # guided: both branches in one batch
    assert calls == [rows] + [min(3, rows - i) for i in range(0, rows, 3)]
    # fp32 GEMMs block differently by batch size: a few ulps through the network, times the CFG scale
    torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_micro_batch_accumulates_passes_with_a_graph(name):
    """With a graph, micro_batch rows a call forward and again in backward, one chunk back-propagated at a
    time (each parameter's gradient arrives once per chunk): the gradients of the whole call (compact
    deltas, LoRA factors, and the latents when they require grad) up to fp32 rounding; whole_graphs()
    runs a graph pass in one call."""
    model = models.load(name)
    net = model.network
    masks = {n: torch.arange(0, p.numel(), 3, dtype=torch.int32) for n, p in list(net.named_parameters())[:8]}
    change = params.CompactDelta(net, masks)
    lora = params.add_lora(net, params.layer_names(net, r".*to_k"), 2, 0)
    for p in change.weights.values():
        p.requires_grad_(True)  # add_lora froze the rest of the network
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a LoRA starts as no change: give B values, so A has a gradient too
        for p in lora:
            p.normal_(0, 0.1, generator=g)
    x, tau = model.noise(5, g), torch.rand(5, generator=g)
    cond = model.encode([f"a blue square {i}" for i in range(5)])
    weight = torch.arange(1.0, 6.0).view(-1, *[1] * (x.dim() - 1))
    calls, arrivals = [], []
    net.register_forward_pre_hook(lambda m, a, kw: calls.append(len((a or [kw["hidden_states"]])[0])),
                                  with_kwargs=True)
    first = next(iter(change.weights.values()))
    first.register_post_accumulate_grad_hook(lambda p: arrivals.append(1))
    grads = []
    try:
        for step in (None, 2):
            model.micro_batch = step
            leaf = x.clone().requires_grad_()
            for p in change.trainable + lora:
                p.grad = None
            (model.predict(leaf, tau, cond).square() * weight).sum().backward()
            grads.append([p.grad.clone() for p in change.trainable + lora] + [leaf.grad])
        assert calls == [5, 2, 2, 1, 2, 2, 1] and len(arrivals) == 1 + 3
        for whole, split in zip(*grads):
            torch.testing.assert_close(split, whole, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
        calls.clear()
        with model.whole_graphs():
            model.predict(x, tau, cond).sum().backward()
        assert calls == [5]
    finally:
        change.restore()


def test_micro_batch_recompute_draws_the_same_dropout():
    """A chunk's recompute in backward restores the random state its forward ran with: with dropout in
    training mode the gradients are those of the same chunks run with a graph from the same seed, and the
    random stream after backward is where forward left it."""
    from fasterase.models.micro_batch import chunked

    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 3)).train()
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(1))
    weight = torch.arange(1.0, 8.0).view(-1, 1)
    grads, outs, after = [], [], []
    for split in (True, False):
        net.zero_grad()
        torch.manual_seed(0)
        out = chunked(net, 3, x) if split else torch.cat([net(x[i:i + 3]) for i in range(0, 7, 3)])
        after.append(torch.rand(4))
        (out * weight).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in net.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)
    for split, reference in zip(*grads):
        torch.testing.assert_close(split, reference, rtol=1e-6, atol=1e-6)


def test_erase_micro_batch(capsys, tmp_path):
    """erase(micro_batch=) runs the rollouts and the teacher in chunks, gives the edit of a whole-pass run
    (up to fp32 rounding), records it, and is reset after; a bad value is refused before any work."""
    plain = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **FAST["esd"])
    model = models.load("toy-sd")
    split = fasterase.erase(model, "circle", method="esd", progress=False, micro_batch=1, **FAST["esd"])
    assert split.report["micro_batch"] == 1 and plain.report["micro_batch"] is None and model.micro_batch is None
    assert split.report["memory_options"] == [{"from_step": 0, "micro_batch": 1, "gradient_checkpointing": False}]
    # Adam divides by sqrt(v): an entry whose gradient is near zero moves by up to lr on a rounding
    # difference, so compare each trained change as a whole: the B factors, which start at zero (a chunk's
    # GEMMs round differently, ~1e-6 relative)
    trained = [k for k in plain.edit.lora if "lora_B" in k]
    assert trained and all(plain.edit.lora[k].norm() > 0 for k in trained)
    for k in trained:
        assert (split.edit.lora[k] - plain.edit.lora[k]).norm() <= 1e-2 * plain.edit.lora[k].norm(), k
    for bad in (0, 2.5, True, "4"):
        with pytest.raises(UserError, match=r"micro_batch \(--micro-batch\) must be a whole number"):
            fasterase.erase("toy-sd", "circle", method="esd", micro_batch=bad)
    out = tmp_path / "edit"
    assert cli.main(["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--micro-batch", "2",
                     "--out", str(out), *[a for k, v in FAST["esd"].items() for a in ("--set", f"{k}={v}")]]) == 0
    assert Edit.load(out).report["micro_batch"] == 2


def test_text_encoders_come_to_the_device_only_to_encode(monkeypatch):
    """On a GPU the text encoders wait on the CPU while the method runs; the device is faked here
    by moving nothing and recording where they were sent."""
    model = models.load("toy-flux")
    moves = []
    monkeypatch.setattr(type(model.network), "device", property(lambda self: torch.device("cuda", 0)))
    for enc in model.text_encoders:
        monkeypatch.setattr(type(enc), "device", property(lambda self: torch.device("cuda", 0)))
        monkeypatch.setattr(enc, "to", lambda d, enc=enc: moves.append((type(enc).__name__, str(d))) or enc)
    monkeypatch.setattr(model, "_encode", lambda prompts: moves.append("encode") or
                        models.Cond(torch.zeros(len(prompts), 5, 8), torch.zeros(len(prompts), 8)))
    with model.text_encoders_offloaded():
        model.encode(["a red circle"])
        model.encode(["a red circle"])  # cached: nothing runs, nothing moves
    to_cpu, to_gpu = [(n, d) for n in ("CLIPTextModel", "T5EncoderModel") for d in ("cpu", "cuda:0")][::2], \
        [(n, "cuda:0") for n in ("CLIPTextModel", "T5EncoderModel")]
    assert moves == to_cpu + to_gpu + ["encode"] + to_cpu + to_gpu


def test_text_encoders_go_back_each_to_its_own_device(monkeypatch):
    """A text encoder the user keeps on the CPU beside a GPU network stays there after the run."""
    model = models.load("toy-flux")
    moves = []
    where = {"CLIPTextModel": torch.device("cuda", 0), "T5EncoderModel": torch.device("cpu")}
    monkeypatch.setattr(type(model.network), "device", property(lambda self: torch.device("cuda", 0)))
    for enc in model.text_encoders:
        monkeypatch.setattr(type(enc), "device", property(lambda self: where[type(self).__name__]))
        monkeypatch.setattr(enc, "to", lambda d, enc=enc: moves.append((type(enc).__name__, str(d))) or enc)
    with model.text_encoders_offloaded():
        pass
    assert moves == [("CLIPTextModel", "cpu"), ("T5EncoderModel", "cpu"),
                     ("CLIPTextModel", "cuda:0"), ("T5EncoderModel", "cpu")]


@pytest.mark.parametrize("name", ["toy-sd", "toy-flux"])
def test_encode_cache_follows_a_cast_or_moved_pipeline(name, monkeypatch):
    """Prompts encoded before the pipeline was cast or moved are encoded again, in the new dtype and
    on the new device."""
    model = models.load(name)
    assert model.encode(["a red circle"]).embeds.dtype == torch.float32
    assert models.load(model, dtype="bf16") is model
    cond = model.encode(["a red circle"])
    assert cond.embeds.dtype == torch.bfloat16 and (cond.pooled is None or cond.pooled.dtype == torch.bfloat16)
    monkeypatch.setattr(type(model.network), "device", property(lambda self: torch.device("cuda", 0)))
    monkeypatch.setattr(model, "_encode", lambda prompts: models.Cond(torch.zeros(len(prompts), 5, 8)))
    assert model.encode(["a red circle"]).embeds.shape == (1, 5, 8)  # encoded again, not the CPU's


@pytest.mark.parametrize("resolution, needle", [(30, "multiples of"), ((32, 48, 8), "multiples of"),
                                                (-32, "multiples of"), (True, "multiples of"),
                                                (10**10, r"10000000000x10000000000 px is too large: one image's "
                                                         r"latents would exceed 2\*\*63 bytes"),
                                                (2**31, r"2147483648x2147483648 px is too large to run: a tensor of the "
                                                        r"run would exceed 2\*\*63 bytes")])
def test_bad_resolution(resolution, needle):
    with pytest.raises(UserError, match=needle):
        fasterase.erase("toy-sd", "circle", method="esd", resolution=resolution)


def test_bad_resolution_for_a_folder_is_refused_before_its_weights_load(tmp_path, monkeypatch):
    models.load("toy-flux").pipeline.save_pretrained(tmp_path)
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(UserError, match="resolution 44 .* multiples of 8"):
        fasterase.erase(tmp_path, "circle", method="esd", resolution=44)


def test_resolution_sets_training_and_sampling_size(monkeypatch):
    height, width = 64, 32
    sizes = []
    model = models.load("toy-sd")
    real = model.predict
    monkeypatch.setattr(model, "predict", lambda x, *a: sizes.append(tuple(x.shape[-2:])) or real(x, *a))
    result = fasterase.erase(model, "circle", method="esd", progress=False, resolution=(height, width), **FAST["esd"])
    f = model.pipeline.vae_scale_factor
    assert set(sizes) == {(height // f, width // f)} and result.report["resolution"] == [height, width]
    image = model.generate(["a red square"], seed=0)
    assert image.shape[-2:] == (height, width) and torch.isfinite(image).all()


# --- folders ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("asked", [None, "fp32"])
def test_folder_loads_in_its_own_dtype_or_the_asked_one(tmp_path, asked):
    models.load("toy-flux").pipeline.to(torch.bfloat16).save_pretrained(tmp_path / "flux")
    model = models.load(tmp_path / "flux", dtype=asked)
    want = torch.float32 if asked else torch.bfloat16
    assert {m.dtype for m in (model.network, model.pipeline.vae, *model.text_encoders)} == {want}
    assert torch.isfinite(model.generate(["a red circle"], seed=0)).all()


def test_cli_erase_with_device_and_dtype(tmp_path, capsys):
    out = tmp_path / "edit"
    code = cli.main(["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--device", "cpu",
                     "--dtype", "bf16", "--resolution", "32x48", "--out", str(out), "--set", "steps=2",
                     "--set", "batch_size=2", "--set", "sample_steps=4"])
    assert code == 0
    report = fasterase.edit.Edit.load(out).report
    assert (report["device"], report["dtype"], report["resolution"]) == ("cpu", "bfloat16", [32, 48])
    assert cli.main(["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--dtype", "int4",
                     "--out", str(tmp_path / "x")]) == 2
    assert "valid: fp32, bf16, fp16" in capsys.readouterr().err


def test_fp16_on_the_cpu_is_warned_of_once_where_the_model_runs_so(recwarn, capsys, tmp_path):
    def warned():
        found = [w for w in recwarn if "fp16 on the CPU" in str(w.message)]
        recwarn.clear()
        return len(found)

    fp16 = models.load("toy-sd", "cpu", "fp16").pipeline
    fasterase.erase(fp16, "circle", method="uce", progress=False, copy=True, dtype="bf16")  # cast before it runs
    assert warned() == 0
    with pytest.warns(models.SlowRunWarning) as caught:
        fasterase.erase(fp16, "circle", method="uce", progress=False, copy=True)
    assert len(caught) == 1 and caught[0].filename == __file__  # the user's call


def test_cli_warns_in_one_line(capsys, tmp_path, monkeypatch):
    assert cli.main(["erase", "--model", "toy-sd", "--dtype", "fp16", "--concept", "circle", "--method", "uce",
                     "--out", str(tmp_path / "edit")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == ["fasterase erase: warning: the model runs in fp16 on the CPU, where torch's fp16 matrix products "
                   "are hundreds of times slower than bf16's; choose bf16 or fp32 (dtype=, --dtype)"]
    # the scoring itself is left out: 392 toy images in fp16 take 4-6 minutes on some CPUs (AMD EPYC, 2 cores)
    scored = []
    monkeypatch.setattr("fasterase.eval.evaluate", lambda model, **kw: scored.append(model.network.dtype) or {})
    assert cli.main(["eval", "--edit", str(tmp_path / "edit"), "--json", "--repeats", "1"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and err[0].endswith("make it in bf16 or fp32 (erase --dtype) to evaluate it on the CPU")
    assert scored == [torch.float16]  # evaluated in the dtype the edit was made in


def test_a_refused_resolution_leaves_the_size_as_it_was():
    den = models.load("toy-flux")
    was = den.height, den.width, den.latent_shape(1)
    with pytest.raises(UserError, match="too large"):
        den.set_resolution(2**40)
    assert (den.height, den.width, den.latent_shape(1)) == was


def test_numpy_integers_are_resolutions_too():
    import numpy as np

    den = models.load("toy-sd")
    den.set_resolution((np.int64(32), 48))
    assert (den.height, den.width) == (32, 48) and type(den.height) is int
