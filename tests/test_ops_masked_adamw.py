"""masked_adamw: every backend against the reference (fp64 oracle tolerance), masks, 8-bit, skipping."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fasterase.kernels is first imported

from fasterase import ops  # noqa: E402
from fasterase.ops.adamw import masked_adamw_reference  # noqa: E402
from op_testing import GPU_BACKENDS, assert_update_close, fast_backends, require_built  # noqa: E402

SIZES = [1, 255, 256, 257, 4097, 100_000]
TRITON_SIZES = [1, 257, 1100]  # the interpreter is slow
MASKS = [("none", 1.0)] + [(kind, d) for kind in ("bits", "idx") for d in (0.0, 0.01, 0.5, 1.0)]
DTYPES = [(p, s) for p in (torch.float32, torch.bfloat16) for s in (torch.float32, torch.bfloat16, torch.uint8)]
HYPER = dict(lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)


def make_case(n, kind, density, pdt, sdt, device, seed, gdt=None):
    """Random inputs of one masked_adamw call; the gradient in ``gdt`` (default: the param's dtype)."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(n, generator=g) < density
    mask = None if kind == "none" else ops.pack_mask(sel) if kind == "bits" else ops.mask_to_indices(sel)
    length = int(sel.sum()) if kind == "idx" else n
    case = dict(
        param=torch.randn(n, generator=g).to(pdt),
        grad=(torch.randn(n, generator=g) * 0.1).to(pdt if gdt is None else gdt),
        step=torch.tensor([float(torch.randint(0, 10, (1,), generator=g))]),
        mask=mask,
    )
    if sdt == torch.uint8:
        case["exp_avg"] = torch.randint(0, 256, (length,), generator=g, dtype=torch.uint8)
        case["exp_avg_sq"] = torch.randint(0, 256, (length,), generator=g, dtype=torch.uint8)
        case["absmax"] = (torch.rand(ops.num_blocks(length), generator=g) * 0.1,
                          torch.rand(ops.num_blocks(length), generator=g) * 0.01)
    else:
        case["exp_avg"] = (torch.randn(length, generator=g) * 0.05).to(sdt)
        case["exp_avg_sq"] = (torch.rand(length, generator=g) * 0.01).to(sdt)
        case["absmax"] = None
    return {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device) if v is not None else None)
            for k, v in case.items()}


def clone(case, device=None):
    """A copy of a case's tensors (on ``device`` when given)."""
    return {k: (tuple(t.to(device, copy=True) for t in v) if isinstance(v, tuple)
                else v.to(device, copy=True) if v is not None else None)
            for k, v in case.items()}


def run(case, backend):
    with ops.use_backend(backend):
        found = ops.masked_adamw(case["param"], case["grad"], case["exp_avg"], case["exp_avg_sq"], case["step"],
                                 mask=case["mask"], absmax=case["absmax"], **HYPER)
    assert ops.last_backend("masked_adamw") == backend
    return found


def oracle(case, hyper=HYPER):
    """The reference in fp64 from the same starting point (8-bit states decoded first)."""
    c = clone(case)
    if c["absmax"] is not None:
        m = ops.dequantize_blockwise(c["exp_avg"], c["absmax"][0], ops.dynamic_map(True, c["param"].device))
        v = ops.dequantize_blockwise(c["exp_avg_sq"], c["absmax"][1], ops.dynamic_map(False, c["param"].device))
        c["exp_avg"], c["exp_avg_sq"] = m, v
    p, g, m, v = (c[k].double() for k in ("param", "grad", "exp_avg", "exp_avg_sq"))
    bits = c["mask"] if c["mask"] is not None and c["mask"].dtype == torch.uint8 else None
    idx = c["mask"] if c["mask"] is not None and c["mask"].dtype == torch.int32 else None
    masked_adamw_reference(p, g, m, v, c["step"], torch.zeros(1), bits, idx, None, None, None, None,
                           hyper["lr"], *hyper["betas"], hyper["eps"], hyper["weight_decay"])
    return p, m, v


def selected_positions(case, n):
    mask = case["mask"]
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=case["param"].device)
    if mask.dtype == torch.uint8:
        return ops.unpack_mask(mask, n)
    sel = torch.zeros(n, dtype=torch.bool, device=mask.device)
    sel[mask.long()] = True
    return sel


def check_backend(backend, n, kind, density, pdt, sdt, device="cpu", gdt=None):
    case = make_case(n, kind, density, pdt, sdt, device, seed=n * 7 + int(density * 100), gdt=gdt)
    ref, out = clone(case), clone(case)
    run(ref, "reference")
    found = run(out, backend)
    assert found.item() == 0 and out["step"].item() == case["step"].item() + 1
    sel = selected_positions(case, n)
    # unselected params are bit-identical
    assert torch.equal(out["param"][~sel], case["param"][~sel])
    p64, m64, v64 = oracle(case)
    assert_update_close(out["param"], ref["param"], p64, case["param"], f"{backend} param")
    if sdt == torch.uint8:
        state_sel = slice(None) if kind == "idx" else sel
        for key, a in (("exp_avg", 0), ("exp_avg_sq", 1)):
            diff = (out[key].int() - ref[key].int()).abs()
            assert int(diff.max()) <= 1 if diff.numel() else True, f"{key} codes differ by more than one step"
            assert float((diff > 0).float().mean()) < 0.01 if diff.numel() else True
            torch.testing.assert_close(out["absmax"][a], ref["absmax"][a], rtol=1e-6, atol=0)
            if kind == "bits":
                assert torch.equal(out[key][~sel], case[key][~sel]), f"unselected {key} codes changed"
        del state_sel
    else:
        state_sel = torch.ones(out["exp_avg"].numel(), dtype=torch.bool) if kind == "idx" else sel
        assert torch.equal(out["exp_avg"][~state_sel], case["exp_avg"][~state_sel])
        assert torch.equal(out["exp_avg_sq"][~state_sel], case["exp_avg_sq"][~state_sel])
        assert_update_close(out["exp_avg"], ref["exp_avg"], m64, case["exp_avg"], f"{backend} exp_avg")
        assert_update_close(out["exp_avg_sq"], ref["exp_avg_sq"], v64, case["exp_avg_sq"], f"{backend} exp_avg_sq")


CPU_BACKENDS = fast_backends("cpu")


@pytest.mark.parametrize("pdt,sdt", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind,density", MASKS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b == "cpp"])
def test_cpp_matches_reference(backend, n, kind, density, pdt, sdt):
    check_backend(backend, n, kind, density, pdt, sdt)


@pytest.mark.parametrize("pdt,sdt", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind,density", [("none", 1.0), ("bits", 0.0), ("bits", 0.5), ("idx", 0.01), ("idx", 1.0)])
@pytest.mark.parametrize("n", TRITON_SIZES)
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_interpreted_matches_reference(n, kind, density, pdt, sdt):
    check_backend("triton", n, kind, density, pdt, sdt)


@pytest.mark.gpu
@pytest.mark.parametrize("pdt,sdt", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("kind,density", MASKS)
@pytest.mark.parametrize("n", SIZES + [1 << 22])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference(backend, n, kind, density, pdt, sdt):
    require_built(backend)
    check_backend(backend, n, kind, density, pdt, sdt, device="cuda")


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
@pytest.mark.parametrize("sdt", [torch.float32, torch.uint8])
def test_non_finite_gradient_skips_and_reports(backend, sdt):
    case = make_case(1000, "bits", 0.5, torch.float32, sdt, "cpu", seed=3)
    sel = selected_positions(case, 1000)
    first_selected = int(sel.nonzero()[0])
    bad = clone(case)
    bad["grad"][first_selected] = float("nan")
    found = run(bad, backend)
    assert found.item() == 1
    for key in ("param", "exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(bad[key], case[key]), f"{key} changed on a skipped step"
    # an already-set flag (from another tensor of the same optimizer step) also skips
    again = clone(case)
    with ops.use_backend(backend):
        ops.masked_adamw(again["param"], again["grad"], again["exp_avg"], again["exp_avg_sq"], again["step"],
                         mask=again["mask"], absmax=again["absmax"], found_inf=torch.ones(1), **HYPER)
    assert torch.equal(again["param"], case["param"])
    # a non-finite gradient where the mask is off does not matter
    off = clone(case)
    off["grad"][int((~sel).nonzero()[0])] = float("inf")
    assert run(off, backend).item() == 0 and off["step"].item() == case["step"].item() + 1


@pytest.mark.parametrize("signed", [True, False])
def test_code_cells_hold_at_most_one_midpoint(signed):
    """What the CUDA kernel's 8-bit encoder relies on (csrc/cuda/masked_adamw.cu): cut [-1, 1] into cells by
    sign, exponent and the top 7 mantissa bits (one cell for |x| < 2^-24); then no midpoint of the code map
    is below 2^-24 in magnitude and no cell, closed at both ends, holds more than one midpoint."""
    code = ops.dynamic_map(signed).double()
    mids = ((code[:-1] + code[1:]) * 0.5).float().double()
    assert bool((mids.abs() >= 2.0 ** -24).all())
    bits = torch.arange(103 << 23, (127 << 23) + 1, 1 << 16, dtype=torch.int64).to(torch.int32)
    edges = bits.view(torch.float32).double()  # cell boundaries from 2^-24 to 1
    lo, hi = edges[:-1], edges[1:]
    for a, b in ((lo, hi), (-hi, -lo)):
        inside = ((mids[None, :] >= a[:, None]) & (mids[None, :] <= b[:, None])).sum(dim=1)
        assert int(inside.max()) <= 1


def test_dense_fp32_matches_torch_adamw():
    p = torch.randn(3000)
    q = p.clone().requires_grad_()
    opt = torch.optim.AdamW([q], lr=HYPER["lr"], betas=HYPER["betas"], eps=HYPER["eps"],
                            weight_decay=HYPER["weight_decay"], foreach=False)
    m, v, step = torch.zeros(3000), torch.zeros(3000), torch.zeros(1)
    for i in range(5):
        g = torch.randn(3000, generator=torch.Generator().manual_seed(i))
        q.grad = g.clone()
        opt.step()
        ops.masked_adamw(p, g, m, v, step, **HYPER)
    torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)


def test_update_tolerance_catches_a_dropped_or_truncated_update():
    """The per-element tolerance the tests above use (op_testing.assert_update_close) on bf16 params, whose
    AdamW steps are mostly below one bf16 step of the larger weights: a kernel that stores the old params,
    or truncates the new fp32 values instead of rounding them to nearest even, must fail it; the
    correctly rounded result passes. (The former max-scaled rule, 2 ref_err + eps max|oracle|, passed both.)"""
    case = make_case(4097, "none", 1.0, torch.bfloat16, torch.float32, "cpu", seed=1)
    ref, wide = clone(case), clone(case)
    run(ref, "reference")
    wide["param"] = wide["param"].float()  # the same fp32 arithmetic, kept in fp32 before it is stored
    run(wide, "reference")
    p64 = oracle(case)[0]
    assert torch.equal(wide["param"].bfloat16(), ref["param"])
    truncated = (wide["param"].view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()
    assert_update_close(ref["param"], ref["param"], p64, case["param"], "correct")
    for name, broken in (("dropped", case["param"]), ("truncated", truncated)):
        with pytest.raises(AssertionError, match="elements off"):
            assert_update_close(broken, ref["param"], p64, case["param"], name)


GRAD_MIXES = [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("pdt,gdt", GRAD_MIXES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_param_and_grad_dtypes_match_reference(backend, pdt, gdt, sdt):
    """fp32 params with bf16 gradients and the reverse (both accepted: fp32 master weights with bf16
    gradients), every state dtype and mask kind, against the reference."""
    sizes = [257] if backend == "triton" else [257, 4097]
    for n in sizes:
        for kind, density in (("none", 1.0), ("bits", 0.5), ("idx", 0.3)):
            check_backend(backend, n, kind, density, pdt, sdt, gdt=gdt)


@pytest.mark.gpu
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("pdt,gdt", GRAD_MIXES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_mixed_param_and_grad_dtypes_match_reference(backend, pdt, gdt, sdt):
    require_built(backend)
    for kind, density in (("none", 1.0), ("bits", 0.5), ("idx", 0.3)):
        check_backend(backend, 100_000, kind, density, pdt, sdt, device="cuda", gdt=gdt)


BAD_INDICES = [
    (torch.tensor([0, 5, 3], dtype=torch.int32), "sorted and duplicate-free"),
    (torch.tensor([0, 4, 4, 7], dtype=torch.int32), "sorted and duplicate-free"),
    (torch.tensor([-1, 2], dtype=torch.int32), "holds -1; valid indices of a param of 10 elements: 0 to 9"),
    (torch.tensor([2, 10], dtype=torch.int32), "holds 10; valid"),
    (torch.tensor([[1, 2]], dtype=torch.int32), "must be 1-D"),
    (torch.tensor([1, 2], dtype=torch.int64), "mask has dtype torch.int64; valid: torch.uint8, torch.int32"),
]


@pytest.mark.parametrize("mask,match", BAD_INDICES)
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_bad_index_mask_is_refused_before_any_backend(backend, mask, match):
    """The reference would wrap a negative index and the native kernels read past the param: every backend
    refuses, and nothing is written."""
    length = mask.numel()
    p = torch.randn(10)
    args = (p.clone(), torch.randn(10), torch.zeros(length), torch.zeros(length), torch.zeros(1))
    with ops.use_backend(backend), pytest.raises((ValueError, TypeError), match=match):
        ops.masked_adamw(*args, mask=mask, lr=1e-3)
    assert torch.equal(args[0], p) and args[4].item() == 0
    with ops.use_backend(backend), pytest.raises((ValueError, TypeError), match=match):
        ops.masked_adamw_multi([args[0]], [args[1]], [args[2]], [args[3]], [args[4]], masks=[mask], lr=1e-3)


def test_index_mask_is_checked_again_after_an_in_place_change():
    """A mask found valid is not read again (a host synchronisation on a GPU) until it is modified."""
    idx = torch.tensor([1, 4, 7], dtype=torch.int32)
    args = (torch.randn(10), torch.randn(10), torch.zeros(3), torch.zeros(3), torch.zeros(1))
    ops.masked_adamw(*args, mask=idx, lr=1e-3)
    ops.masked_adamw(*args, mask=idx, lr=1e-3)
    idx[2] = 12
    with pytest.raises(ValueError, match="holds 12"):
        ops.masked_adamw(*args, mask=idx, lr=1e-3)
    # valid for a param of 10 says nothing about a smaller one
    idx[2] = 7
    ops.masked_adamw(*args, mask=idx, lr=1e-3)
    with pytest.raises(ValueError, match="holds 7; valid indices of a param of 6"):
        ops.masked_adamw(torch.randn(6), torch.randn(6), torch.zeros(3), torch.zeros(3), torch.zeros(1), mask=idx,
                         lr=1e-3)


def test_index_masks_of_more_than_2_31_elements_are_refused():
    """int32 indices would wrap past 2^31 - 1 (an expanded tensor: no memory is allocated)."""
    with pytest.raises(ValueError, match="at most 2\\^31 elements, not 2147483649; use a bitmask"):
        ops.mask_to_indices(torch.ones(1, dtype=torch.bool).expand(2 ** 31 + 1))


@pytest.mark.parametrize("bad,match", [
    (dict(grad=torch.zeros(9)), "grad has 9"),
    (dict(grad=torch.zeros(10, dtype=torch.float16)), "grad has dtype torch.float16; valid: torch.float32, "
                                                      "torch.bfloat16"),
    (dict(exp_avg=torch.zeros(10, dtype=torch.float16)), "exp_avg has dtype"),
    (dict(mask=torch.zeros(3, dtype=torch.uint8)), "bitmask has 3 bytes"),
    (dict(mask=torch.zeros(3, dtype=torch.int64)), "mask has dtype"),
    (dict(exp_avg=torch.zeros(10, dtype=torch.uint8), exp_avg_sq=torch.zeros(10, dtype=torch.uint8)), "absmax"),
    (dict(step=torch.zeros(2)), "exactly one element"),
])
def test_bad_input_names_what_is_valid(bad, match):
    args = dict(param=torch.zeros(10), grad=torch.zeros(10), exp_avg=torch.zeros(10), exp_avg_sq=torch.zeros(10),
                step=torch.zeros(1))
    mask = bad.pop("mask", None)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.masked_adamw(**args, mask=mask, lr=1e-3)


def test_torch_compile_fake_impl():
    torch.library.opcheck(torch.ops.fasterase.masked_adamw.default, (
        torch.randn(300), torch.randn(300), torch.zeros(300), torch.zeros(300), torch.zeros(1), torch.zeros(1),
        None, None, None, None, None, None, 1e-3, 0.9, 0.999, 1e-8, 0.0), test_utils=("test_schema", "test_faketensor"))


# ---- masked_adamw_multi: the list form (one call, one skip decision for every tensor) ----

MULTI_HYPER = dict(lr=[3e-3, 1e-3, 2e-2, 5e-4, 3e-3, 1e-2], betas=[(0.9, 0.99), (0.8, 0.999), (0.9, 0.99),
                   (0.95, 0.98), (0.9, 0.999), (0.5, 0.9)], eps=[1e-8, 1e-6, 1e-8, 1e-7, 1e-8, 1e-8],
                   weight_decay=[0.05, 0.0, 0.1, 0.05, 0.01, 0.2])


def multi_cases(sizes, seed, pdt=None, sdt=None):
    """One case per size, cycling through mask kinds and (unless fixed) param/state dtypes."""
    kinds = [("none", 1.0), ("bits", 0.5), ("idx", 0.3), ("bits", 0.0), ("idx", 1.0), ("none", 1.0)]
    cases = []
    for k, n in enumerate(sizes):
        kind, density = kinds[k % len(kinds)]
        p, s = DTYPES[(k + seed) % len(DTYPES)] if pdt is None else (pdt, sdt)
        cases.append(make_case(n, kind, density, p, s, "cpu", seed=seed * 100 + k))
    return cases


def hyper_for(i):
    return dict(lr=MULTI_HYPER["lr"][i], betas=MULTI_HYPER["betas"][i], eps=MULTI_HYPER["eps"][i],
                weight_decay=MULTI_HYPER["weight_decay"][i])


def run_multi(cases, backend, found_inf=None):
    count = len(cases)
    with ops.use_backend(backend):
        found = ops.masked_adamw_multi(
            [c["param"] for c in cases], [c["grad"] for c in cases], [c["exp_avg"] for c in cases],
            [c["exp_avg_sq"] for c in cases], [c["step"] for c in cases],
            masks=[c["mask"] for c in cases], absmax=[c["absmax"] for c in cases], found_inf=found_inf,
            **{k: v[:count] for k, v in MULTI_HYPER.items()})
    assert ops.last_backend("masked_adamw_multi") == backend
    return found


def run_single(case, backend, i):
    with ops.use_backend(backend):
        return ops.masked_adamw(case["param"], case["grad"], case["exp_avg"], case["exp_avg_sq"], case["step"],
                                mask=case["mask"], absmax=case["absmax"], **hyper_for(i))


MULTI_SIZES = [1, 255, 257, 4097, 256, 100_000]
# (backend, device) pairs the list-form tests run: here, and on a GPU each GPU backend
MULTI_BACKENDS = [(b, "cpu") for b in ["reference"] + CPU_BACKENDS] + [
    pytest.param(b, "cuda", marks=pytest.mark.gpu, id=f"{b}-cuda") for b in GPU_BACKENDS]


@pytest.mark.parametrize("seed", range(len(DTYPES)))
@pytest.mark.parametrize("backend,device", MULTI_BACKENDS)
def test_multi_equals_one_call_per_tensor(backend, device, seed):
    """Every dtype and mask kind, odd sizes, per-tensor hyperparameters: the list form gives exactly
    (bit for bit) what the same backend's per-tensor op gives, and the per-tensor op is held to the
    reference above; the list-form reference equals the per-tensor reference exactly."""
    if device == "cuda":
        require_built(backend)
    sizes = [1, 255, 257, 1100] if backend == "triton" and device == "cpu" else MULTI_SIZES
    cases = multi_cases(sizes, seed)
    multi, single = [clone(c, device) for c in cases], [clone(c, device) for c in cases]
    assert run_multi(multi, backend).item() == 0
    for i, c in enumerate(single):
        run_single(c, backend, i)
    for i, (a, b) in enumerate(zip(multi, single)):
        for key in ("param", "exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a[key], b[key]), (i, key)
        if a["absmax"] is not None:
            assert torch.equal(a["absmax"][0], b["absmax"][0]) and torch.equal(a["absmax"][1], b["absmax"][1])


@pytest.mark.parametrize("pdt,sdt", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend,device", [p for p in MULTI_BACKENDS if p != ("reference", "cpu")])
def test_multi_matches_reference(backend, device, pdt, sdt):
    """Each tensor of a list-form call against the reference with the fp64-oracle tolerance; masked-out
    params and states bit-identical."""
    if device == "cuda":
        require_built(backend)
    sizes = [1, 257, 1100] if backend == "triton" and device == "cpu" else [1, 255, 257, 4097, 100_000]
    cases = multi_cases(sizes, seed=11, pdt=pdt, sdt=sdt)
    ref, out = [clone(c) for c in cases], [clone(c, device) for c in cases]
    run_multi(ref, "reference")
    assert run_multi(out, backend).item() == 0
    out = [clone(o, "cpu") for o in out]
    for i, (case, r, o) in enumerate(zip(cases, ref, out)):
        n = case["param"].numel()
        assert o["step"].item() == case["step"].item() + 1
        sel = selected_positions(case, n)
        assert torch.equal(o["param"][~sel], case["param"][~sel])
        if sdt == torch.uint8:
            for key, a in (("exp_avg", 0), ("exp_avg_sq", 1)):
                diff = (o[key].int() - r[key].int()).abs()
                assert diff.numel() == 0 or int(diff.max()) <= 1
                torch.testing.assert_close(o["absmax"][a], r["absmax"][a], rtol=1e-6, atol=0)
                if case["mask"] is not None and case["mask"].dtype == torch.uint8:
                    assert torch.equal(o[key][~sel], case[key][~sel])
        p64, m64, v64 = oracle(case, hyper_for(i))
        if sdt != torch.uint8:
            state_sel = torch.ones(o["exp_avg"].numel(), dtype=torch.bool) if (
                case["mask"] is not None and case["mask"].dtype == torch.int32) else sel
            for key, o64 in (("exp_avg", m64), ("exp_avg_sq", v64)):
                assert torch.equal(o[key][~state_sel], case[key][~state_sel])
                assert_update_close(o[key], r[key], o64, case[key], f"{backend} {key} {i}")
        assert_update_close(o["param"], r["param"], p64, case["param"], f"{backend} param {i}")


@pytest.mark.parametrize("where", ["first", "last", "unselected", "preset"])
@pytest.mark.parametrize("sdt", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("backend,device", MULTI_BACKENDS)
def test_multi_non_finite_anywhere_skips_every_tensor(backend, device, sdt, where):
    """A NaN/inf in any gradient (even in a masked-out entry, even in the last tensor after good ones),
    or a flag already set: no tensor, state or step changes, and found_inf is 1."""
    if device == "cuda":
        require_built(backend)
    sizes = [257, 1100, 300] if backend == "triton" and device == "cpu" else [257, 4097, 100_000, 300]
    for pdt in (torch.float32, torch.bfloat16):
        cases = multi_cases(sizes, seed=5, pdt=pdt, sdt=sdt)
        cases[1]["mask"] = ops.pack_mask(torch.arange(cases[1]["param"].numel()) % 3 == 0)  # bitmask, 1/3 on
        if sdt == torch.uint8:
            length = cases[1]["param"].numel()
            cases[1]["exp_avg"], cases[1]["exp_avg_sq"] = (torch.randint(0, 256, (length,), dtype=torch.uint8),
                                                           torch.randint(0, 256, (length,), dtype=torch.uint8))
            cases[1]["absmax"] = (torch.rand(ops.num_blocks(length)), torch.rand(ops.num_blocks(length)))
        else:
            cases[1]["exp_avg"] = torch.zeros(cases[1]["param"].numel(), dtype=sdt)
            cases[1]["exp_avg_sq"] = torch.zeros(cases[1]["param"].numel(), dtype=sdt)
            cases[1]["absmax"] = None
        bad = [clone(c) for c in cases]
        found_inf = None
        if where == "first":
            bad[0]["grad"][3] = float("nan")
        elif where == "last":
            bad[-1]["grad"][-1] = float("-inf")
        elif where == "unselected":
            bad[1]["grad"][1] = float("inf")  # entry 1 is off in the bitmask
        else:
            found_inf = torch.ones(1, device=device)
        bad = [clone(b, device) for b in bad]
        found = run_multi(bad, backend, found_inf=found_inf)
        assert found.item() == 1
        bad = [clone(b, "cpu") for b in bad]
        for i, (b, c) in enumerate(zip(bad, cases)):
            for key in ("param", "exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(b[key], c[key]), (where, i, key)
            if c["absmax"] is not None:
                assert torch.equal(b["absmax"][0], c["absmax"][0]) and torch.equal(b["absmax"][1], c["absmax"][1])


def test_multi_loop_fallback_skips_before_any_write():
    """The per-tensor loop used by the Triton and CUDA backends, run here with the per-tensor reference:
    a NaN in the last tensor's gradient must stop the first tensor's update too."""
    from fasterase.ops.adamw import masked_adamw_multi_loop

    cases = multi_cases([300, 400], seed=2, pdt=torch.float32, sdt=torch.float32)  # dense, then a bitmask
    assert cases[0]["mask"] is None and cases[1]["mask"].dtype == torch.uint8
    cases[1]["grad"][7] = float("nan")
    bad = [clone(c) for c in cases]
    found = torch.zeros(1)
    masked_adamw_multi_loop(masked_adamw_reference, [c["param"] for c in bad], [c["grad"] for c in bad],
                            [c["exp_avg"] for c in bad], [c["exp_avg_sq"] for c in bad], [c["step"] for c in bad],
                            found, [bad[0]["mask"], bad[1]["mask"]], [None, None], [None, None], [None, None],
                            None, None,
                            [1e-3] * 2, [0.9] * 2, [0.99] * 2, [1e-8] * 2, [0.0] * 2)
    assert found.item() == 1
    for b, c in zip(bad, cases):
        assert torch.equal(b["param"], c["param"]) and torch.equal(b["step"], c["step"])


def test_multi_bad_input_names_what_is_valid():
    p, z = [torch.zeros(10)], [torch.zeros(10)]
    with pytest.raises(ValueError, match="grads has 2 entries"):
        ops.masked_adamw_multi(p, z * 2, z, z, [torch.zeros(1)], lr=1e-3)
    with pytest.raises(ValueError, match="lr has 2 entries"):
        ops.masked_adamw_multi(p, z, z, z, [torch.zeros(1)], lr=[1e-3, 1e-3])
    with pytest.raises(TypeError, match="exp_avg has dtype"):
        ops.masked_adamw_multi(p, z, [torch.zeros(10, dtype=torch.float16)], z, [torch.zeros(1)], lr=1e-3)
    with pytest.raises(ValueError, match="need lr >= 0"):
        ops.masked_adamw_multi(p, z, z, z, [torch.zeros(1)], lr=-1.0)


def test_tensors_a_step_writes_must_not_share_memory():
    """An alias (one step count for two tensors, one param twice, a state overlapping a param) would race
    in the CUDA kernels, which write every tensor in parallel: refused by name before any backend runs.
    Disjoint views of one buffer are separate tensors, as a flat partition's are."""
    flat, step = torch.zeros(20), torch.zeros(1)
    a, b = torch.zeros(10), torch.zeros(10)
    with pytest.raises(ValueError, match=r"steps\[0\] and steps\[1\] share memory"):
        ops.masked_adamw_multi([a, b], [a.clone(), b.clone()], [a.clone(), b.clone()], [a.clone(), b.clone()],
                               [step, step], lr=1e-3)
    with pytest.raises(ValueError, match=r"params\[0\] and params\[1\] share memory"):
        ops.masked_adamw_multi([a, a], [a.clone()] * 2, [a.clone(), b.clone()], [a.clone(), b.clone()],
                               [torch.zeros(1), torch.zeros(1)], lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg and param share memory|param and exp_avg share memory"):
        ops.masked_adamw(flat[:10], torch.ones(10), flat[5:15], torch.zeros(10), step, lr=1e-3)
    assert step.item() == 0 and not flat.any()
    codes = torch.full((1024,), 127, dtype=torch.uint8)  # a bitmask read while the codes are written
    with pytest.raises(ValueError, match="mask and exp_avg share memory"):
        ops.masked_adamw(torch.zeros(1024), torch.ones(1024), codes, torch.zeros(1024, dtype=torch.uint8), step,
                         lr=1e-3, mask=codes[:128], absmax=(torch.zeros(4), torch.zeros(4)))
    halves = [flat[:10], flat[10:]]
    ops.masked_adamw_multi(halves, [torch.ones(10)] * 2, [torch.zeros(10), torch.zeros(10)],
                           [torch.zeros(10), torch.zeros(10)], [torch.zeros(1), torch.zeros(1)], lr=1e-3,
                           weight_decay=0.0)
    assert torch.allclose(flat, torch.full((20,), -1e-3))


def test_multi_torch_compile_fake_impl():
    n = [300, 17]
    torch.library.opcheck(torch.ops.fasterase.masked_adamw_multi.default, (
        [torch.randn(k) for k in n], [torch.randn(k) for k in n], [torch.zeros(k) for k in n],
        [torch.zeros(k) for k in n], [torch.zeros(1), torch.zeros(1)], torch.zeros(1), [None, None], [None, None],
        [None, None], [None, None], None, None, [1e-3, 1e-3], [0.9, 0.9], [0.999, 0.999], [1e-8, 1e-8], [0.0, 0.0]),
        test_utils=("test_schema", "test_faketensor"))
