"""The training loop: determinism, resume, the non-finite guard."""
import pytest
import torch

from fasterase.training import loop


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


def test_resume_equals_uninterrupted(tmp_path):
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
    w2, o2 = make()  # a new process: fresh values, resumed from the checkpoint
    loop.train(loss_fn(w2), [w2], o2, 25, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    assert torch.equal(w2, w_full)


def test_checkpoint_of_another_run(tmp_path):
    ckpt = tmp_path / "run.ckpt"
    w, o = make()
    loop.train(loss_fn(w), [w], o, 5, seed=1, checkpoint=ckpt, checkpoint_every=5, progress=False)
    w, o = make()
    with pytest.raises(ValueError, match="another run"):
        loop.train(loss_fn(w), [w], o, 10, seed=2, checkpoint=ckpt, progress=False)


def test_non_finite_loss_stops():
    w, o = make()
    before = w.detach().clone()

    def f(step, g):
        return (w * float("nan")).sum()

    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss"):
        loop.train(f, [w], o, 5, seed=0, progress=False)
    assert torch.equal(w, before)
