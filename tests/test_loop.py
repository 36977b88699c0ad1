"""The training loop: determinism, resume, the non-finite guard."""
import pytest
import torch

from fasterase.errors import UserError
from fasterase.training import engine, loop


def make():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6))
    return w, torch.optim.AdamW([w], lr=0.05)


def loss_fn(w):
    def f(step, g):
        x = torch.randn(6, generator=g)
        return ((w - x) ** 2).sum()
    return f


def test_deterministic():
    w1, o1 = make()
    loop.train(loss_fn(w1), [w1], o1, 20, seed=3, progress=False)
    w2, o2 = make()
    loop.train(loss_fn(w2), [w2], o2, 20, seed=3, progress=False)
    assert torch.equal(w1, w2)
    w3, o3 = make()
    loop.train(loss_fn(w3), [w3], o3, 20, seed=4, progress=False)
    assert not torch.equal(w1, w3)


def test_resume_equals_uninterrupted(tmp_path, capsys):
    w_full, o = make()
    loop.train(loss_fn(w_full), [w_full], o, 25, seed=1, progress=False)

    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    base = loss_fn(w)

    def interrupted(step, g):
        if step == 13:
            raise KeyboardInterrupt
        return base(step, g)

    with pytest.raises(KeyboardInterrupt):
        loop.train(interrupted, [w], o, 25, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert torch.load(ckpt, weights_only=False)["step"] == 13
    assert f"interrupted after step 13 of 25: saved to {ckpt}; the same call again resumes" in capsys.readouterr().err
    w2, o2 = make()  # a new process: fresh values, resumed from the checkpoint
    loop.train(loss_fn(w2), [w2], o2, 25, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert torch.equal(w2, w_full)
    with pytest.raises(KeyboardInterrupt):  # without a checkpoint it says how to keep the progress
        loop.train(interrupted, [w], o, 25, seed=1, progress=False)
    assert "nothing was saved: with a checkpoint file (--set checkpoint=FILE" in capsys.readouterr().err


class _Model:
    """What train() reads of a Denoiser: its memory options for the report, its dtype for the loss scale."""

    def __init__(self, micro_batch, checkpointing, dtype=torch.float32):
        self.micro_batch = micro_batch
        self.network = type("Network", (), {"is_gradient_checkpointing": checkpointing, "dtype": dtype})()


def test_an_fp16_network_trains_on_its_loss_scaled_gradients():
    """A mean over 2^20 entries, predictions 0.01 from their targets, computed in fp16: each entry's
    gradient (about 2e-8) flushes to zero in fp16, and the unscaled step was 90% off fp32's (relative L2);
    with the loss scaled the optimizer gets fp32's gradient to within fp16's rounding of the predictions
    (2^-11 of |x|, about 5% of the 0.01 differences: 3% measured), and the report has the scale."""
    x = torch.randn(16384, 64, generator=torch.Generator().manual_seed(0))
    target = x + 0.01 * torch.randn(16384, 64, generator=torch.Generator().manual_seed(1))

    def step(dtype):
        w = torch.nn.Parameter(torch.ones(64))  # the fp32 master of an fp16 network's weights
        loss = lambda step, g: ((x.to(dtype) * w.to(dtype)).float() - target).square().mean()  # noqa: E731
        stats = loop.train(loss, [w], torch.optim.SGD([w], lr=1.0), 1, seed=0, progress=False,
                           model=_Model(None, False, dtype))
        return 1.0 - w.detach(), stats  # the gradient SGD stepped with

    reference, stats = step(torch.float32)
    assert "loss_scale" not in stats
    grad, stats = step(torch.float16)
    assert stats["loss_scale"] == 2.0**16 and stats["skipped_steps"] == 0
    assert (grad - reference).norm() / reference.norm() < 0.1


def test_an_overflowing_scale_halves_and_its_step_is_not_counted_as_skipped():
    """d loss / d h is 1 per entry: times 2^16 it is inf in fp16, times 2^15 it is not."""
    w = torch.nn.Parameter(torch.ones(8))
    loss = lambda step, g: (torch.ones(8, dtype=torch.float16) * w.half()).float().sum()  # noqa: E731
    stats = loop.train(loss, [w], torch.optim.SGD([w], lr=1.0), 3, seed=0, progress=False, max_skipped_steps=0,
                       model=_Model(None, False, torch.float16))
    assert stats["loss_scale"] == 2.0**15 and stats["skipped_steps"] == 0 and stats["steps"] == 3
    assert torch.equal(w.detach(), torch.full((8,), -1.0))  # two steps of -1 taken


def test_the_loss_scale_halves_on_overflow_and_grows_after_clean_steps(monkeypatch):
    from fasterase.training import loss_scale

    scale = loss_scale.LossScale(enabled=True)
    assert scale.value == 2.0**16 and scale.overflowed() and scale.value == 2.0**15
    monkeypatch.setattr(loss_scale, "GROWTH_INTERVAL", 3)
    for _ in range(3):
        scale.stepped()
    assert scale.value == 2.0**16
    scale.value = 1.0
    assert not scale.overflowed() and scale.value == 1.0  # at 1 an overflow is the gradients' own: counted
    off = loss_scale.LossScale(enabled=False)
    assert off.value == 1.0 and not off.overflowed()
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 8.0)
    off.unscale([w])
    assert torch.equal(w.grad, torch.full((3,), 8.0))


def test_a_run_resumed_with_other_memory_options_records_each(tmp_path):
    """memory_options lists the steps each micro_batch / gradient checkpointing setting ran, across resumes;
    a resume with the same settings adds nothing, and a finished checkpoint gives the history back."""
    ckpt = tmp_path / "run.ckpt"
    first = {"micro_batch": None, "gradient_checkpointing": False}
    w, o = make()
    base = loss_fn(w)

    def stop_at(n):
        def f(step, g):
            if step == n:
                raise KeyboardInterrupt
            return base(step, g)
        return f

    with pytest.raises(KeyboardInterrupt):
        loop.train(stop_at(4), [w], o, 12, seed=1, checkpoint=ckpt, progress=False, model=_Model(None, False))
    with pytest.raises(KeyboardInterrupt):
        loop.train(stop_at(6), [w], o, 12, seed=1, checkpoint=ckpt, progress=False, model=_Model(None, False))
    stats = loop.train(base, [w], o, 12, seed=1, checkpoint=ckpt, progress=False, model=_Model(2, True))
    both = [{"from_step": 0, **first}, {"from_step": 6, "micro_batch": 2, "gradient_checkpointing": True}]
    assert stats["memory_options"] == both
    again = loop.train(base, [w], o, 12, seed=1, checkpoint=ckpt, progress=False, model=_Model(1, False))
    assert again["steps"] == 12 and again["memory_options"] == both
    assert loop.train(base, [w], o, 3, seed=1, progress=False)["memory_options"] == []  # no model: not known


def test_checkpoint_of_another_run(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    loop.train(loss_fn(w), [w], o, 5, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    w, o = make()
    with pytest.raises(UserError, match=r"another run: its seed \(1 there, 2 here\); steps \(5 there, 10 here"):
        loop.train(loss_fn(w), [w], o, 10, seed=2, checkpoint=ckpt, progress=False)


def test_non_finite_loss_stops():
    w, o = make()
    before = w.detach().clone()

    def f(step, g):
        return (w * float("nan")).sum()

    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss"):
        loop.train(f, [w], o, 5, seed=0, progress=False)
    assert torch.equal(w, before)


SETTING = {"kind": "sd", "size": [32, 48], "schedule": {"prediction_type": "epsilon"}, "text": "cafe"}


def ident(setting=SETTING, **change):
    cfg = {"lr": 1e-3, "steps": 10, "seed": 1, "checkpoint": "a.ckpt", "max_skipped_steps": 10, **change}
    return loop.identity("esd", [{"name": "circle"}], cfg, "f00d", setting)


def test_checkpoint_records_the_run_identity(tmp_path):
    """Another concept, learning rate, base model, image size, noise schedule or text encoder is refused by
    name; the checkpoint path and the skip limit are not part of the identity."""
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=ident())
    cfg = ident()["config"]
    for other, name in [(loop.identity("esd", [{"name": "square"}], cfg, "f00d", SETTING), "run.concepts"),
                        (ident(lr=5e-4), r"run.config.lr \(0.001 there, 0.0005 here"),
                        (loop.identity("esd", [{"name": "circle"}], cfg, "beef", SETTING), "run.base_fingerprint"),
                        (loop.identity("ant", [{"name": "circle"}], cfg, "f00d", SETTING), "run.method"),
                        (ident({**SETTING, "size": [64, 64]}), r"run.model.size \(\[32, 48\] there, \[64, 64\] here"),
                        (ident({**SETTING, "schedule": {"prediction_type": "v_prediction"}}),
                         "run.model.schedule.prediction_type"),
                        (ident({**SETTING, "text": "beef"}), "run.model.text")]:
        w, o = make()
        with pytest.raises(UserError, match=f"another run: its {name}"):
            loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=other)
    w, o = make()
    loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False,
               run=ident(checkpoint="elsewhere.ckpt", max_skipped_steps=0))


def test_another_method_or_kind_counts_what_follows_from_it_and_names_the_rest(tmp_path):
    """Another method's config fields and another kind of model's settings follow from it and are counted;
    other concepts do not, and are named beside it."""
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=ident())
    ant = loop.identity("ant", [{"name": "square"}], {"lr": 1e-4, "rank": 1}, "f00d", SETTING)
    flux = loop.identity("esd", [{"name": "square"}], ident()["config"], "f00d",
                         {**SETTING, "kind": "flux", "size": [64, 64]})
    for other, told in [(ant, r"run.method \('esd' there, 'ant' here\); \d+ more that follow from it; run.concepts"),
                        (flux, r"run.model.kind \('sd' there, 'flux' here\); 1 more that follows from it; "
                               r"run.concepts")]:
        w, o = make()
        with pytest.raises(UserError, match=f"another run: its {told}"):
            loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=other)
    # its steps differ within more than eight config fields (summarised): told once, with the config, as are
    # the trainable tensors' shapes
    config = {"lr": 1e-4, "steps": 20, "seed": 1, **{f"k{i}": i for i in range(10)}}
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(UserError, match=r"another run: its run.method \('esd' there, 'ant' here\); 13 more that follow "
                                        r"from it differ from"):
        loop.train(loss_fn(w), [w], torch.optim.SGD([w], lr=0.1), 20, seed=1, checkpoint=ckpt, progress=False,
                   run=loop.identity("ant", [{"name": "circle"}], config, "f00d", SETTING))


def test_another_runs_checkpoint_is_refused_before_the_engine_starts(tmp_path, monkeypatch):
    """A plain run's checkpoint named by a ZeRO run (another config) is refused before DeepSpeed starts."""
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=ident())
    monkeypatch.setattr(loop.engines, "make", lambda *a, **k: pytest.fail("the engine started"))
    w, o = make()
    with pytest.raises(UserError, match="another run: its run.config.zero"):
        loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=ident(zero=2), zero=2)


def test_finished_checkpoint_gives_its_result_without_training(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    first = loop.train(loss_fn(w), [w], o, 12, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False,
                       run=ident())
    assert torch.load(ckpt, weights_only=False)["finished"]

    def never(step, g):
        raise AssertionError("a finished run trained again")

    w2, o2 = make()
    again = loop.train(never, [w2], o2, 12, seed=1, checkpoint=ckpt, progress=False, run=ident())
    timing = ("train_time_s",)  # wall seconds of this call's own steps: none here
    assert again["train_time_s"] == 0.0
    assert {k: v for k, v in again.items() if k not in timing} == {k: v for k, v in first.items() if k not in timing}
    assert torch.equal(w2, w)
    assert o2.state_dict()["state"] == {}  # the values are the result: the optimizer is not read back


def nan_grads_at(steps_with_nan, w, base):
    """loss_fn with a finite loss whose gradient is NaN at the given steps (the optimizer would skip
    or write NaN)."""
    def f(step, g):
        loss = base(step, g)
        if step in steps_with_nan:
            def once(grad):
                handle.remove()
                return grad * float("nan")
            handle = w.register_hook(once)
        return loss
    return f


def make_two(optimizer):
    torch.manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(6)) for _ in range(2)]
    if optimizer == "salient":
        from fasterase.optim import SalientAdamW
        return ws, SalientAdamW(ws, lr=0.05, weight_decay=0.0)
    return ws, torch.optim.AdamW(ws, lr=0.05, weight_decay=0.0)


@pytest.mark.parametrize("optimizer", ["adamw", "salient"])
def test_non_finite_gradients_skip_the_step_and_are_counted(optimizer):
    """Plain AdamW wrote NaN into the weights and SalientAdamW skipped silently; both now skip,
    the report counts it, and past the limit training stops. The NaN is in the second parameter's
    gradient only."""
    ws, o = make_two(optimizer)

    def base(step, g):
        x = torch.randn(6, generator=g)
        return sum(((w - x) ** 2).sum() for w in ws)

    stats = loop.train(nan_grads_at({3, 7}, ws[1], base), ws, o, 10, seed=0, progress=False, max_skipped_steps=2)
    assert stats["skipped_steps"] == 2 and stats["steps"] == 10
    assert all(torch.isfinite(w).all() for w in ws)
    ws, o = make_two(optimizer)
    with pytest.raises(loop.NonFiniteGradients, match="2 of 8 steps skipped, more than max_skipped_steps=1"):
        loop.train(nan_grads_at({3, 7}, ws[1], base), ws, o, 10, seed=0, progress=False, max_skipped_steps=1)


def test_skipped_steps_survive_resume(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    full = loop.train(nan_grads_at({2}, w, loss_fn(w)), [w], o, 10, seed=1, progress=False, max_skipped_steps=5)
    w, o = make()
    base = nan_grads_at({2}, w, loss_fn(w))

    def interrupted(step, g):
        if step == 6:
            raise KeyboardInterrupt
        return base(step, g)

    with pytest.raises(KeyboardInterrupt):
        loop.train(interrupted, [w], o, 10, seed=1, checkpoint=ckpt, progress=False, max_skipped_steps=5)
    w2, o2 = make()
    resumed = loop.train(loss_fn(w2), [w2], o2, 10, seed=1, checkpoint=ckpt, progress=False, max_skipped_steps=5)
    assert resumed["skipped_steps"] == full["skipped_steps"] == 1


@pytest.mark.gpu
def test_skip_covers_every_device():
    """Parameters on the CPU and the GPU: a NaN gradient on the GPU skips the step on both, for the
    loop and for SalientAdamW's own flag."""
    from fasterase.optim import SalientAdamW

    ws = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300, device="cuda"))]
    before = [w.detach().clone() for w in ws]
    ws[0].grad = torch.ones(300)
    ws[1].grad = torch.ones(300, device="cuda")
    assert engine.grads_finite(ws)
    ws[1].grad[5] = float("nan")
    assert not engine.grads_finite(ws)
    o = SalientAdamW(ws, lr=0.1)
    o.step()
    assert o.last_step_skipped
    assert all(torch.equal(w, b) for w, b in zip(ws, before))
    ws[1].grad[5] = 1.0
    o.step()
    assert not o.last_step_skipped and not any(torch.equal(w, b) for w, b in zip(ws, before))


def test_esd_checkpoint_belongs_to_its_run(tmp_path):
    """Rerunning with the same checkpoint for another concept continued the old run (and a finished
    one gave the old result under the new name); now it is refused, and the same run gets its result."""
    import fasterase

    fast = {"steps": 2, "batch_size": 1, "sample_steps": 2, "checkpoint": str(tmp_path / "esd.ckpt")}
    first = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **fast).edit
    with pytest.raises(UserError, match="run.concepts"):
        fasterase.erase("toy-sd", "square", method="esd", progress=False, **fast)
    with pytest.raises(UserError, match="run.config.lr"):
        fasterase.erase("toy-sd", "circle", method="esd", progress=False, lr=5e-4, **fast)
    again = fasterase.erase("toy-sd", "circle", method="esd", progress=False, **fast).edit
    assert first.lora.keys() == again.lora.keys() and all(torch.equal(first.lora[k], again.lora[k]) for k in first.lora)


class _Payload:
    """Unpickling it would run code: it writes a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_path_mistakes_are_refused_before_any_work(tmp_path, monkeypatch):
    """A missing folder failed after training, a folder was an IsADirectoryError, an empty path meant
    no checkpoint, an edit file was called another run's checkpoint to delete, and any pickle was
    unpickled."""
    import fasterase
    from fasterase import models

    monkeypatch.setattr(models, "load", lambda m: pytest.fail("loaded the model before checking the checkpoint"))
    edit = tmp_path / "edit.safetensors"
    edit.write_bytes(b"not a checkpoint")
    marker = tmp_path / "ran"
    torch.save({"x": _Payload(marker)}, tmp_path / "evil.pt")
    for path, needle in [("", "checkpoint"), ("  ", "checkpoint"), (str(tmp_path), "is a folder"),
                         (str(tmp_path / "nope" / "a.pt"), "does not exist"),
                         (str(edit / "a.pt"), "does not exist"),
                         (str(edit), "not a fasterase training checkpoint"),
                         (str(tmp_path / "evil.pt"), "not a fasterase training checkpoint")]:
        with pytest.raises(UserError, match=needle) as info:
            fasterase.erase("toy-sd", "circle", method="esd", checkpoint=path)
        assert "delete" not in str(info.value)
    assert not marker.exists() and edit.read_bytes() == b"not a checkpoint"


def test_a_checkpoint_inside_out_is_refused_before_training(capsys, tmp_path, monkeypatch):
    import fasterase
    from fasterase.cli import main

    monkeypatch.setattr(fasterase, "erase", lambda *a, **k: pytest.fail("trained before checking the checkpoint"))
    out = tmp_path / "e"
    code = main(["erase", "--model", "toy-sd", "--concept", "circle", "--method", "esd", "--out", str(out),
                 "--set", f"checkpoint={out / 'c.pt'}"])
    assert code == 2 and "inside --out" in capsys.readouterr().err


def test_another_run_names_steps_and_seed_once(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, progress=False, run=ident())
    w, o = make()
    with pytest.raises(UserError) as info:
        loop.train(loss_fn(w), [w], o, 12, seed=2, checkpoint=ckpt, progress=False, run=ident(steps=12, seed=2))
    message = str(info.value)
    assert "run.config.steps (10 there, 12 here)" in message and "run.config.seed (1 there, 2 here)" in message
    assert message.count("steps (") == 1 and message.count("seed (") == 1, message


@pytest.mark.parametrize("optimizer", ["adamw", "salient"])
def test_checkpoints_load_as_plain_tensors(tmp_path, optimizer):
    ckpt = tmp_path / "run.ckpt"
    ws, o = make_two(optimizer)
    loop.train(loss_fn(ws[0]), ws, o, 3, seed=1, checkpoint=ckpt, progress=False, run=ident())
    assert torch.load(ckpt, weights_only=True)["finished"]
    ws, o = make_two(optimizer)
    loop.train(loss_fn(ws[0]), ws, o, 3, seed=1, checkpoint=ckpt, progress=False, run=ident())


def test_the_temporary_checkpoint_never_takes_a_users_file(tmp_path):
    """The checkpoint was written to FILE.tmp first, replacing and then removing a file of that name."""
    ckpt, precious = tmp_path / "run.ckpt", tmp_path / "run.ckpt.tmp"
    precious.write_text("the user's")
    w, o = make()
    loop.train(loss_fn(w), [w], o, 4, seed=0, checkpoint=ckpt, checkpoint_every=2, progress=False)
    assert precious.read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.ckpt", "run.ckpt.tmp"]


@pytest.mark.parametrize("error, free", [
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 102912 vs 102864"), 0),
    (OSError(28, "No space left on device"), None),
])
def test_a_full_disk_is_named_and_leaves_no_checkpoint_half_written(tmp_path, monkeypatch, error, free):
    """torch.save's own message names no disk (torch 2.13 on a full tmpfs: "unexpected pos"); a write that
    fails with no room left is said to be for want of room, with the room left; another error is its own."""
    import collections
    import shutil

    ckpt = tmp_path / "run.ckpt"
    real, usage = torch.save, shutil.disk_usage
    if free is not None:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: collections.namedtuple("u", "total used free")(1, 1, free))

    def full(state, f, *a, **k):
        real({"partial": torch.zeros(10)}, f)
        raise error

    monkeypatch.setattr(torch, "save", full)
    w, o = make()
    with pytest.raises(UserError, match=rf"checkpoint {ckpt}: could not be written in {tmp_path}, the disk has no room "
                                        r"for it .* GB free there"):
        loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(shutil, "disk_usage", usage)  # room enough: the writer's own error, unchanged
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a writer's bug")))
    w, o = make()
    with pytest.raises(RuntimeError, match="a writer's bug"):
        loop.train(loss_fn(w), [w], o, 10, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method, owner, name, options, what", [
    ("ant", None, "trajectory_loss", {}, "ANT's saliency map"),
    ("fade", "Adversary", "train_d", {"rollouts": 2, "sample_steps": 4}, "FADE's D pretraining and saliency map"),
    ("trace", None, "train_step", {"rollouts": 1, "d_batch": 4}, "TRACE's concept scorer training"),
])
def test_an_interrupt_before_training_says_nothing_was_saved(tmp_path, monkeypatch, capsys, method, owner, name,
                                                              options, what):
    """Ctrl-C (or SIGTERM, which the CLI raises as one) while a method prepares names the phase and that the
    same call starts again: the checkpoint holds training steps, and none was taken."""
    import importlib

    import fasterase

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    module = importlib.import_module(f"fasterase.methods.{method}")
    monkeypatch.setattr(getattr(module, owner) if owner else module, name, interrupt)
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        fasterase.erase("toy-sd", "circle", method=method, checkpoint=str(tmp_path / "c.pt"), progress=False,
                        **options)
    assert (f"interrupted during {what}, before the first training step: nothing was saved; the same call starts "
            "again") in capsys.readouterr().err
    assert not (tmp_path / "c.pt").exists()


def test_an_interrupt_before_training_resumes_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    """ANT maps its salient entries again before it resumes an earlier call's checkpoint: an interrupt there
    keeps that checkpoint and says that the same call resumes from it."""
    import fasterase
    from fasterase.methods import ant

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    ckpt = tmp_path / "c.pt"
    options = {"steps": 4, "batch_size": 2, "sample_steps": 4, "saliency_prompts": 2, "saliency_seeds": 1}
    real, calls = ant.ant_loss, []
    monkeypatch.setattr(ant, "ant_loss", lambda *a: interrupt() if calls.append(1) or len(calls) == 3 else real(*a))
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):  # after two steps
        fasterase.erase("toy-sd", "circle", method="ant", checkpoint=str(ckpt), progress=False, **options)
    saved = ckpt.read_bytes()
    monkeypatch.setattr(ant, "trajectory_loss", interrupt)
    monkeypatch.setenv("FASTERASE_CACHE", str(tmp_path / "another cache"))  # the map is made again, not read
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        fasterase.erase("toy-sd", "circle", method="ant", checkpoint=str(ckpt), progress=False, **options)
    assert (f"interrupted during ANT's saliency map, before training resumes: checkpoint {ckpt} is kept, and the "
            "same call resumes from it") in capsys.readouterr().err
    assert ckpt.read_bytes() == saved
