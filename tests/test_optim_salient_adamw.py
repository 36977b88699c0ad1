"""SalientAdamW: torch AdamW equivalence, masks, memory proportional to what trains, skipping,
state_dict round trip, and the 8-bit path against bitsandbytes' AdamW8bit."""
import io

import pytest
import torch

from fasterase import ops
from fasterase.optim import SalientAdamW
from op_testing import fast_backends

HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def grads_for(step, shapes):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in shapes]


def train(opt, params, steps=5):
    shapes = [p.shape for p in params]
    for i in range(steps):
        for p, g in zip(params, grads_for(i, shapes)):
            p.grad = g
        opt.step()


def test_unmasked_fp32_equals_torch_adamw():
    ours = [torch.randn(300, 7).requires_grad_(), torch.randn(5).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    train(SalientAdamW(ours, state_dtype="fp32", **HYPER), ours)
    train(torch.optim.AdamW(theirs, foreach=False, **HYPER), theirs)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["bool", "indices", "bitmask"])
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
def test_masked_entries_and_states_never_change(form, state_dtype):
    torch.manual_seed(0)
    p = torch.randn(64, 100).requires_grad_()
    sel = torch.rand(64, 100) < 0.3
    mask = {"bool": sel, "indices": ops.mask_to_indices(sel), "bitmask": ops.pack_mask(sel)}[form]
    start = p.detach().clone()
    opt = SalientAdamW([p], masks={p: mask}, state_dtype=state_dtype, min_8bit_size=1, **HYPER)
    train(opt, [p])
    assert torch.equal(p.detach()[~sel], start[~sel])
    assert not torch.equal(p.detach()[sel], start[sel])
    state = opt.state[p]
    expected_len = int(sel.sum()) if form != "bitmask" else p.numel()
    assert state["exp_avg"].numel() == expected_len
    if form == "bitmask":  # full-size states: unselected entries keep their initial (zero) codes/values
        initial = 127 if state_dtype == "8bit" else 0
        assert bool((state["exp_avg"][~sel.view(-1)] == initial).all())
        assert bool((state["exp_avg_sq"][~sel.view(-1)] == 0).all())


def test_masked_step_equals_torch_adamw_on_selected_entries():
    torch.manual_seed(1)
    p = torch.randn(40, 50).requires_grad_()
    sel = torch.rand(40, 50) < 0.5
    sub = p.detach()[sel].clone().requires_grad_()
    opt = SalientAdamW([p], masks={p: sel}, state_dtype="fp32", **HYPER)
    ref = torch.optim.AdamW([sub], foreach=False, **HYPER)
    for i in range(4):
        g = grads_for(i, [p.shape])[0]
        p.grad, sub.grad = g, g[sel]
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach()[sel], sub.detach(), rtol=1e-5, atol=1e-6)


def test_state_memory_is_proportional_to_selection():
    big = torch.zeros(1000, 1000).requires_grad_()
    frozen = torch.zeros(500, 500).requires_grad_()
    sel = torch.zeros(1000, 1000, dtype=torch.bool)
    sel.view(-1)[::100] = True  # 1% of the entries
    opt = SalientAdamW([big, frozen], masks={big: sel, frozen: torch.zeros(500, 500, dtype=torch.bool)}, **HYPER)
    big.grad, frozen.grad = torch.ones_like(big), torch.ones_like(frozen)
    opt.step()
    assert len(opt.state[frozen]) == 0  # no selected entry: no state at all
    k = int(sel.sum())
    assert opt.state_bytes() == 2 * k + 2 * 4 * ops.num_blocks(k) + 4  # two 8-bit states, two absmax, step
    assert opt.state_bytes() < 0.03 * big.numel() * 8  # vs fp32 AdamW's 8 bytes per entry


def test_non_finite_gradient_skips_every_parameter():
    a, b = torch.randn(300).requires_grad_(), torch.randn(300).requires_grad_()
    opt = SalientAdamW([a, b], **HYPER)
    train(opt, [a, b], steps=1)
    before = [a.detach().clone(), b.detach().clone()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)]
    a.grad, b.grad = torch.randn(300), torch.randn(300)
    b.grad[7] = float("nan")  # the bad tensor comes after a good one
    opt.step()
    assert opt.last_step_skipped
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    for p, saved in zip((a, b), states):
        for key, value in saved.items():
            assert torch.equal(opt.state[p][key], value), key
    train(opt, [a, b], steps=1)
    assert not opt.last_step_skipped


@pytest.mark.parametrize("state_dtype", ["8bit", "bf16"])
def test_state_dict_round_trip(state_dtype):
    torch.manual_seed(2)
    p = torch.randn(100, 60).requires_grad_()
    sel = torch.rand(100, 60) < 0.4
    opt = SalientAdamW([p], masks={p: sel}, state_dtype=state_dtype, min_8bit_size=1, **HYPER)
    train(opt, [p], steps=3)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    q = p.detach().clone().requires_grad_()
    restored = SalientAdamW([q], state_dtype=state_dtype, min_8bit_size=1, **HYPER)  # mask comes from the state
    restored.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for key, value in opt.state[p].items():
        assert restored.state[q][key].dtype == value.dtype and torch.equal(restored.state[q][key], value), key
    for params, o in (([p], opt), ([q], restored)):
        for i in range(3, 6):
            params[0].grad = grads_for(i, [p.shape])[0]
            o.step()
    assert torch.equal(p, q)
    wrong = SalientAdamW([q], masks={q: ~sel}, **HYPER)
    with pytest.raises(ValueError, match="mask"):
        wrong.load_state_dict(opt.state_dict())


def test_bad_configuration_is_explained():
    p = torch.zeros(10, requires_grad=True)
    with pytest.raises(ValueError, match="state_dtype"):
        SalientAdamW([p], state_dtype="int4")
    with pytest.raises(ValueError, match="sorted"):
        SalientAdamW([p], masks={p: torch.tensor([3, 1], dtype=torch.int32)})
    with pytest.raises(TypeError, match="fp32 or bf16"):
        SalientAdamW([torch.zeros(3, dtype=torch.float16, requires_grad=True)])
    with pytest.raises(TypeError, match="mask dtype"):
        SalientAdamW([p], masks={p: torch.zeros(10)})


def test_8bit_format_is_bitsandbytes_blockwise():
    """Same code maps and decoding as bitsandbytes; encoding is nearest-code, as in bitsandbytes'
    GPU kernels and its pure-torch backend (its CPU library can differ for values close to 0)."""
    F = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        code = ops.dynamic_map(signed)
        assert torch.equal(code, F.create_dynamic_map(signed=signed))
        codes = torch.randint(0, 256, (1000,), dtype=torch.uint8)
        absmax = torch.rand(ops.num_blocks(1000))
        theirs = F.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=256)
        assert torch.equal(ops.dequantize_blockwise(codes, absmax, code), theirs)
        x = torch.randn(1000) if signed else torch.rand(1000)
        ours, ours_absmax = ops.quantize_blockwise(x, code)
        theirs, state = F.quantize_blockwise(x, code=code, blocksize=256)
        assert torch.equal(ours_absmax, state.absmax)
        assert (ours != theirs).float().mean().item() < 0.01
        assert (ours.int() - theirs.int()).abs().max().item() <= 1


def test_8bit_follows_bitsandbytes_adamw8bit_for_50_steps():
    """50 steps next to bitsandbytes' AdamW8bit (CPU) from the same start with the same gradients.
    Stated tolerance: the two 8-bit trajectories differ by less than a quarter of what 8-bit states
    themselves change (the distance of AdamW8bit from fp32 torch AdamW), in relative L2 over the
    distance travelled; and by at most 1.5 lr on any entry."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(3)
    hyper = dict(lr=1e-3, betas=(0.9, 0.995), eps=1e-8, weight_decay=1e-2)
    shapes = [(96, 80), (4100,)]
    start = [torch.randn(s) for s in shapes]
    ours, theirs, fp32 = ([p.clone().requires_grad_() for p in start] for _ in range(3))
    opts = [SalientAdamW(ours, **hyper), bnb.optim.AdamW8bit(theirs, **hyper), torch.optim.AdamW(fp32, **hyper)]
    for i in range(50):
        for group in (ours, theirs, fp32):
            for p, g in zip(group, grads_for(i, shapes)):
                p.grad = g.clone()
        for opt in opts:
            opt.step()
    flat = [torch.cat([p.detach().reshape(-1) for p in group]) for group in (start, ours, theirs, fp32)]
    travelled = (flat[3] - flat[0]).norm()
    ours_vs_bnb = ((flat[1] - flat[2]).norm() / travelled).item()
    bnb_vs_fp32 = ((flat[2] - flat[3]).norm() / travelled).item()
    assert ours_vs_bnb < 0.25 * bnb_vs_fp32, (ours_vs_bnb, bnb_vs_fp32)
    assert (flat[1] - flat[2]).abs().max().item() <= 1.5 * hyper["lr"]


def per_tensor_steps(opt_params, masks, groups, state_dtype, min_8bit_size, steps):
    """What SalientAdamW must do, spelled out with one ops.masked_adamw call per tensor (states built by
    hand): the comparison for the list-form call SalientAdamW makes."""
    states = []
    for p in opt_params:
        mask = masks.get(p)
        length = mask.numel() if mask is not None and mask.dtype == torch.int32 else p.numel()
        eight = state_dtype == "8bit" and length >= min_8bit_size
        dtype = torch.uint8 if eight else {"8bit": torch.float32, "bf16": torch.bfloat16,
                                           "fp32": torch.float32}[state_dtype]
        st = dict(step=torch.zeros(1), m=torch.full((length,), 127 if eight else 0, dtype=dtype),
                  v=torch.zeros(length, dtype=dtype))
        st["absmax"] = (torch.zeros(ops.num_blocks(length)), torch.zeros(ops.num_blocks(length))) if eight else None
        states.append(st)
    shapes = [p.shape for p in opt_params]
    for i in range(steps):
        found = torch.zeros(1)
        for p, g, st, h in zip(opt_params, grads_for(i, shapes), states, groups):
            ops.masked_adamw(p.detach().view(-1), g.to(p.dtype).view(-1), st["m"], st["v"], st["step"], **h,
                             mask=masks.get(p), absmax=st["absmax"], found_inf=found)
    return states


@pytest.mark.parametrize("backend", ["reference"] + fast_backends("cpu"))
@pytest.mark.parametrize("state_dtype", ["fp32", "bf16", "8bit"])
def test_groups_masks_and_mixed_states_equal_per_tensor_ops(backend, state_dtype):
    """Two param groups with their own hyperparameters, fp32 and bf16 params, dense / index / bitmask
    masks, 8-bit and (small tensors) fp32 states in one step: bit-identical to one masked_adamw call
    per tensor, for every CPU backend."""
    torch.manual_seed(4)
    shapes = [(1,), (255,), (33, 9), (4097,), (64, 100)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16, torch.float32]
    start = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone() for t in start]
    sel = torch.rand(64, 100) < 0.3
    sel2 = torch.rand(4097) < 0.6
    masks_ours = {ours[4]: sel, ours[3]: ops.pack_mask(sel2)}
    masks_theirs = {theirs[4]: ops.mask_to_indices(sel), theirs[3]: ops.pack_mask(sel2)}
    g1 = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    g2 = dict(lr=3e-3, betas=(0.8, 0.999), eps=1e-6, weight_decay=0.0)
    groups = [g1, g2, g1, g2, g2]
    with ops.use_backend(backend):
        opt = SalientAdamW([dict(params=[ours[0], ours[2]], **g1), dict(params=[ours[1], ours[3], ours[4]], **g2)],
                           masks=masks_ours, state_dtype=state_dtype, min_8bit_size=300)
        for i in range(3):
            for p, g in zip(ours, grads_for(i, shapes)):
                p.grad = g.to(p.dtype)
            opt.step()
        assert not opt.last_step_skipped
        states = per_tensor_steps(theirs, masks_theirs, groups, state_dtype, 300, 3)
    assert ops.last_backend("masked_adamw_multi") == backend
    for p, q, st in zip(ours, theirs, states):
        assert torch.equal(p.detach(), q)
        s = opt.state[p]
        assert torch.equal(s["exp_avg"], st["m"]) and torch.equal(s["exp_avg_sq"], st["v"])
        assert torch.equal(s["step"], st["step"])
        if st["absmax"] is not None:
            assert torch.equal(s["absmax_m"], st["absmax"][0]) and torch.equal(s["absmax_v"], st["absmax"][1])


@pytest.mark.parametrize("state_dtype", ["fp32", "8bit"])
def test_non_finite_gradient_in_a_masked_out_entry_still_skips(state_dtype):
    """The optimizer-wide rule: a non-finite gradient anywhere (even where no entry trains, in another
    param group) skips the step for every parameter."""
    torch.manual_seed(5)
    a, b = torch.randn(5000).requires_grad_(), torch.randn(70, 70).requires_grad_()
    sel = torch.rand(70, 70) < 0.5
    opt = SalientAdamW([dict(params=[a]), dict(params=[b], lr=1e-3)], masks={b: sel}, state_dtype=state_dtype,
                       **HYPER)
    train(opt, [a, b], steps=1)
    before = [a.detach().clone(), b.detach().clone()]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in (a, b)]
    a.grad, b.grad = torch.randn(5000), torch.randn(70, 70)
    b.grad[~sel] = float("inf")
    opt.step()
    assert opt.last_step_skipped
    assert torch.equal(a.detach(), before[0]) and torch.equal(b.detach(), before[1])
    for p, saved in zip((a, b), states):
        for key, value in saved.items():
            assert torch.equal(opt.state[p][key], value), key
