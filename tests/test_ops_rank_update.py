"""rank_one_update / closed_form_update: backends against the reference, and the formulas they implement."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fasterase.kernels is first imported

from fasterase import ops  # noqa: E402
from fasterase.ops import _dispatch  # noqa: E402
from op_testing import (GPU_BACKENDS, assert_update_close, fast_backends, require_built,  # noqa: E402
                        unit_roundoff_bound)

CPU_BACKENDS = fast_backends("cpu")
WDTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, cols) shape groups: sizes 1, 255, 256, 257, 4097 and ~1e5 elements
SHAPES = [(1, 1), (15, 17), (16, 16), (1, 257), (17, 241), (320, 320)]
TRITON_SHAPES = [(1, 1), (15, 17), (17, 241)]


def lowrank_error_bound(w, left, right):
    """A-priori bound on the fp32 error of W + (W L^T) R at each element, whatever the summation order: each
    entry is a sum of cols * k products and W, so gamma_(cols + k + 1) (|W| + (|W| |L|^T) |R|) (Higham 3.5)."""
    k, cols = left.shape
    w, left, right = w.double().abs(), left.double().abs(), right.double().abs()
    return unit_roundoff_bound(cols + k + 1) * (w + (w @ left.t()) @ right)


def shared_matmul_error_bound(w, transform, addend):
    """The same for W @ T + A: gamma_(cols + 1) (|W| |T| + |A|)."""
    product = w.double().abs() @ transform.double().abs()
    return unit_roundoff_bound(w.shape[1] + 1) * (product + (addend.double().abs() if addend is not None else 0))


def weights_for(shape, dtype, count, device, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(count)]


def check_lowrank(backend, shape, dtype, k, per_weight, device="cpu"):
    count = 3
    base = weights_for(shape, dtype, count, device, seed=shape[0] * 31 + shape[1])
    g = torch.Generator().manual_seed(k)
    lead = (count,) if per_weight else ()
    left = (torch.randn(*lead, k, shape[1], generator=g) / shape[1] ** 0.5).to(device)
    right = (torch.randn(*lead, k, shape[1], generator=g) / shape[1] ** 0.5).to(device)
    ref = [w.clone() for w in base]
    out = [w.clone() for w in base]
    oracle = [w.double() for w in base]
    ops.lowrank_update_reference(oracle, left.double(), right.double())
    with ops.use_backend("reference"):
        torch.ops.fasterase.lowrank_update(ref, left, right)
    with ops.use_backend(backend):
        torch.ops.fasterase.lowrank_update(out, left, right)
    for i, (o, r, x, w) in enumerate(zip(out, ref, oracle, base)):
        bound = lowrank_error_bound(w, left[i] if per_weight else left, right[i] if per_weight else right)
        assert_update_close(o.cpu(), r.cpu(), x.cpu(), w.cpu(), f"{backend} lowrank {shape} {dtype}",
                            compute_bound=bound.cpu())


def check_shared_matmul(backend, shape, dtype, with_addends, device="cpu"):
    count = 3
    base = weights_for(shape, dtype, count, device, seed=shape[0] + 5)
    g = torch.Generator().manual_seed(1)
    transform = (torch.eye(shape[1]) + torch.randn(shape[1], shape[1], generator=g) / shape[1]).to(device)
    addends = [torch.randn(shape, generator=g).to(device) for _ in range(count)] if with_addends else []
    ref, out, oracle = [w.clone() for w in base], [w.clone() for w in base], [w.double() for w in base]
    ops.shared_matmul_reference(oracle, transform.double(), [a.double() for a in addends])
    with ops.use_backend("reference"):
        torch.ops.fasterase.shared_matmul(ref, transform, addends)
    with ops.use_backend(backend):
        torch.ops.fasterase.shared_matmul(out, transform, addends)
    for i, (o, r, x, w) in enumerate(zip(out, ref, oracle, base)):
        bound = shared_matmul_error_bound(w, transform, addends[i] if addends else None)
        assert_update_close(o.cpu(), r.cpu(), x.cpu(), w.cpu(), f"{backend} shared_matmul {shape} {dtype}",
                            compute_bound=bound.cpu())


@pytest.mark.parametrize("per_weight", [False, True])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", WDTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fasterase._C not built")
def test_cpp_lowrank_matches_reference(shape, dtype, k, per_weight):
    check_lowrank("cpp", shape, dtype, k, per_weight)


@pytest.mark.parametrize("with_addends", [False, True])
@pytest.mark.parametrize("dtype", WDTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fasterase._C not built")
def test_cpp_shared_matmul_matches_reference(shape, dtype, with_addends):
    check_shared_matmul("cpp", shape, dtype, with_addends)


@pytest.mark.parametrize("dtype", WDTYPES, ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES)
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_interpreted_matches_reference(shape, dtype):
    check_lowrank("triton", shape, dtype, k=3, per_weight=True)
    check_shared_matmul("triton", shape, dtype, with_addends=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_interpreted_several_row_blocks_shared_factors(dtype):
    """Rows beyond one block of either kernel (BLOCK_R = 16, BM = 32) and a partial last one, columns beyond
    one tile, left/right shared by every weight (PER_WEIGHT=False), and the closed form without addends."""
    check_lowrank("triton", (45, 40), dtype, k=2, per_weight=False)
    check_shared_matmul("triton", (45, 40), dtype, with_addends=False)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_launches_large_groups_in_grid_slices(monkeypatch):
    """A group of more weights than grid axis 1 holds (65535) is launched in slices; with the slice size
    made 2, three weights take two launches, each reaching its own weights' tables, factors and addends."""
    from fasterase.kernels import rank_update as triton_rank_update

    monkeypatch.setattr(triton_rank_update, "MAX_GRID_Y", 2)
    check_lowrank("triton", (15, 17), torch.float32, k=2, per_weight=True)
    check_lowrank("triton", (15, 17), torch.bfloat16, k=1, per_weight=False)
    check_shared_matmul("triton", (15, 17), torch.float32, with_addends=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", WDTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [(1280, 768), (3072, 4096)])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference(backend, shape, dtype):
    require_built(backend)
    for k, per_weight in ((1, False), (5, True)):
        check_lowrank(backend, shape, dtype, k, per_weight, device="cuda")
    check_shared_matmul(backend, shape, dtype, with_addends=True, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_groups_of_more_weights_than_a_grid_axis_holds(backend):
    """70000 weights of one shape (grid axes 1 and 2 stop at 65535): every weight updated, the last ones
    included. The reference's formula evaluated batched (fp32 and the fp64 oracle), the weights views of
    one buffer."""
    require_built(backend)
    count, k, shape = 70000, 2, (1, 8)
    g = torch.Generator().manual_seed(70000)
    base = torch.randn(count, *shape, generator=g)
    left = torch.randn(count, k, shape[1], generator=g) / shape[1] ** 0.5
    right = torch.randn(count, k, shape[1], generator=g) / shape[1] ** 0.5
    out = base.cuda()
    with ops.use_backend(backend):
        torch.ops.fasterase.lowrank_update(list(out.unbind(0)), left.cuda(), right.cuda())
    ref = base + (base @ left.transpose(1, 2)) @ right
    b, lo, r = base.double(), left.double(), right.double()
    oracle = b + (b @ lo.transpose(1, 2)) @ r
    bound = unit_roundoff_bound(shape[1] + k + 1) * (b.abs() + (b.abs() @ lo.abs().transpose(1, 2)) @ r.abs())
    assert_update_close(out.cpu(), ref, oracle, base, f"{backend} lowrank {count} weights", compute_bound=bound)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS
                         + [pytest.param(b, marks=pytest.mark.gpu, id=f"{b}-cuda") for b in GPU_BACKENDS])
def test_weights_without_rows_are_left_as_they_are(backend):
    """Two (0, 8) weights in one shape group: nothing to write, and no backend fails on the empty group."""
    device = "cuda" if backend in GPU_BACKENDS and torch.cuda.is_available() else "cpu"
    if device == "cuda":
        require_built(backend)
    weights = [torch.empty(0, 8, device=device) for _ in range(2)]
    sources = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    with ops.use_backend(backend):
        ops.closed_form_update(weights, sources.to(device), sources.flip(0).to(device))
        ops.rank_one_update(weights, sources[0].to(device), sources[1].to(device))
    assert all(w.shape == (0, 8) for w in weights)


def test_weights_that_share_memory_and_empty_embeddings_are_refused():
    """One weight twice would be updated twice by the reference and once, racing, by the native kernels."""
    w, buf = torch.randn(4, 6), torch.randn(48)
    e = torch.randn(6)
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        ops.rank_one_update([w, w], e, e.flip(0))
    with pytest.raises(ValueError, match=r"weights\[0\] and weights\[1\] share memory"):
        ops.closed_form_update([buf[:24].view(4, 6), buf[12:36].view(4, 6)], torch.randn(2, 6), torch.randn(2, 6))
    ops.closed_form_update([buf[:24].view(4, 6), buf[24:].view(4, 6)], torch.randn(2, 6), torch.randn(2, 6))
    with pytest.raises(ValueError, match="width of at least 1"):
        ops.rank_one_update([torch.randn(5, 0)], torch.randn(1, 0), torch.randn(1, 0))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_rank_one_update_is_trace_eq1(backend):
    """dW = eta (W e_u - W e_w) e_w^T / ||e_w||^2, all shape groups in one call; rank k the joint solve."""
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g, dtype=torch.float64).float() for s in ((8, 12), (8, 12), (5, 12), (7, 9))]
    e_u = [torch.randn(2, w.shape[1], generator=g) for w in weights]
    e_w = [torch.randn(2, w.shape[1], generator=g) for w in weights]
    expected = []
    for w, u, c in zip(weights, e_u, e_w):
        w64, u64, c64 = w.double(), u.double(), c.double()
        dw = 0.7 * (w64 @ (u64 - c64).t()) @ torch.linalg.solve(c64 @ c64.t(), c64)
        expected.append(w64 + dw)
    with ops.use_backend(backend):
        ops.rank_one_update(weights, e_u, e_w, eta=0.7)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(w.double(), e, rtol=1e-5, atol=1e-5)
    # shared embeddings: one (in,) pair for every weight of that width
    w = torch.randn(6, 12, generator=g)
    u, c = torch.randn(12, generator=g), torch.randn(12, generator=g)
    expected = w + 0.5 * torch.outer(w @ u - w @ c, c) / c.dot(c)
    with ops.use_backend(backend):
        ops.rank_one_update([w], u, c, eta=0.5)
    torch.testing.assert_close(w, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_rank_one_update_maps_every_concept_exactly(backend):
    """At eta = 1, (W + dW) e_w_j = W e_u_j for every row j at once, also for correlated rows."""
    g = torch.Generator().manual_seed(3)
    e_w = torch.randn(3, 17, generator=g, dtype=torch.float64)
    e_w[1] = 0.9 * e_w[0] + 0.1 * e_w[1]  # far from orthogonal: the plain sum of eq. 1 would miss
    e_u = torch.randn(3, 17, generator=g, dtype=torch.float64)
    w0 = torch.randn(11, 17, generator=g, dtype=torch.float64)
    w = w0.float().clone()
    with ops.use_backend(backend):
        ops.rank_one_update([w], e_u.float(), e_w.float())
    torch.testing.assert_close(w.double() @ e_w.t(), w0 @ e_u.t(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [5, 16, 23])  # fewer embeddings than the width (the n x n solve), as many, more
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_closed_form_is_uce(backend, n):
    """W <- (lam W + sum d_i v_i c_i^T)(lam I + sum d_i c_i c_i^T)^-1, via targets and via explicit values."""
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=g) for s in ((10, 16), (10, 16), (4, 16))]
    c = torch.randn(n, 16, generator=g)
    cs = torch.randn(n, 16, generator=g)
    d = torch.rand(n, generator=g) * 2 + 0.25
    lam = 0.3
    m = lam * torch.eye(16, dtype=torch.float64) + (c.double() * d.double()[:, None]).t() @ c.double()
    values = [torch.randn(n, w.shape[0], generator=g) for w in weights]
    for mode in ("targets", "values"):
        ws = [w.clone() for w in weights]
        expected = []
        for i, w in enumerate(weights):
            v = (w.double() @ cs.double().t()).t() if mode == "targets" else values[i].double()
            num = lam * w.double() + (v * d.double()[:, None]).t() @ c.double()
            expected.append(num @ torch.linalg.inv(m))
        with ops.use_backend(backend):
            if mode == "targets":
                ops.closed_form_update(ws, c, cs, lam=lam, row_weights=d)
            else:
                ops.closed_form_update(ws, c, lam=lam, row_weights=d, values=values)
        for w, e in zip(ws, expected):
            torch.testing.assert_close(w.double(), e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call,match", [
    (lambda: ops.rank_one_update([torch.zeros(3)], torch.ones(3), torch.ones(3)), "2-D"),
    (lambda: ops.rank_one_update([torch.zeros(2, 3, dtype=torch.int32)], torch.ones(3), torch.ones(3)), "dtype"),
    (lambda: ops.rank_one_update([torch.zeros(2, 3)], torch.ones(4), torch.ones(4)), "width"),
    (lambda: ops.rank_one_update([torch.zeros(2, 3)], torch.ones(3), torch.zeros(3)), "non-zero norm"),
    (lambda: ops.rank_one_update([torch.zeros(2, 3)], torch.ones(2, 3), torch.ones(2, 3)), "linearly independent"),
    (lambda: ops.rank_one_update([torch.zeros(2, 3)], torch.ones(0, 3), torch.ones(0, 3)), "1 to 64 embedding rows"),
    (lambda: ops.rank_one_update([torch.zeros(2, 3)], torch.ones(65, 3), torch.ones(65, 3)), "got 65"),
    (lambda: ops.closed_form_update([torch.zeros(2, 3)], torch.ones(1, 3)), "exactly one of"),
    (lambda: ops.closed_form_update([torch.zeros(2, 3)], torch.ones(1, 3), torch.ones(1, 3), lam=0.0), "lam"),
])
def test_bad_input_is_explained(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _with(t: torch.Tensor, row: int, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[row] = value
    return t


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_inputs_are_refused_before_any_weight_changes(bad):
    """One NaN or inf in what an in-place update reads would reach every weight it writes; a bad input for
    the second weight (another shape group) was found after the first was written."""
    g = torch.Generator().manual_seed(3)
    base = [torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    c, cs, d = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g), torch.rand(3, generator=g) + 0.5
    v = [torch.randn(3, 5, generator=g), torch.randn(3, 3, generator=g)]
    x = float(bad)
    calls = {
        "e_u": lambda ws: ops.rank_one_update(ws, _with(c[0], 4, x), c[1]),
        "e_w\\[1\\]": lambda ws: ops.rank_one_update(ws, [c[:2], c[:2]], [c[1:], _with(c[1:], 2, x)]),
        "e_u\\[1\\]": lambda ws: ops.rank_one_update(ws, [c[0], _with(c[0], 6, x)], [c[1], c[1]]),
        "eta": lambda ws: ops.rank_one_update(ws, c[0], c[1], eta=x),
        "sources": lambda ws: ops.closed_form_update(ws, _with(c, 8, x), cs),
        "targets": lambda ws: ops.closed_form_update(ws, c, _with(cs, 0, x)),
        "row_weights": lambda ws: ops.closed_form_update(ws, c, cs, row_weights=_with(d, 1, x)),
        "values\\[1\\]": lambda ws: ops.closed_form_update(ws, c, values=[v[0], _with(v[1], 4, x)]),
        "lam": lambda ws: ops.closed_form_update(ws, c, cs, lam=x),
    }
    for name, call in calls.items():
        ws = [w.clone() for w in base]
        with pytest.raises(ValueError, match=f"^{name} (has non-finite|must be finite)"):
            call(ws)
        assert all(torch.equal(w, b) for w, b in zip(ws, base)), name


def test_a_bad_embedding_width_for_a_later_weight_changes_no_weight():
    ws = [torch.randn(5, 7), torch.randn(3, 4)]
    before = [w.clone() for w in ws]
    with pytest.raises(ValueError, match="a weight has input width 4"):
        ops.rank_one_update(ws, torch.randn(7), torch.randn(7))
    with pytest.raises(ValueError, match=r"per-weight embeddings for width 4 must all be \(k, 4\)"):
        ops.rank_one_update(ws, [torch.randn(7), torch.randn(3)], [torch.randn(7), torch.randn(3)])
    assert all(torch.equal(w, b) for w, b in zip(ws, before))


def test_fake_impls():
    torch.library.opcheck(torch.ops.fasterase.lowrank_update.default,
                          ([torch.randn(4, 5)], torch.randn(2, 5), torch.randn(2, 5)),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.fasterase.shared_matmul.default, ([torch.randn(4, 5)], torch.randn(5, 5), []),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fasterase._C not built")
@pytest.mark.parametrize("left,right,match", [
    (torch.zeros(65, 4), torch.zeros(65, 4), "k = 65 rows of left/right; valid: 1 to 64"),
    (torch.zeros(0, 4), torch.zeros(0, 4), "k = 0 rows"),
    (torch.zeros(2, 5), torch.zeros(2, 5), "are 5 wide, the weights 4"),
    (torch.zeros(2, 4), torch.zeros(3, 4), "must have one shape"),
    (torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), r"\(2, k, in\) per weight"),
    (torch.zeros(2, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64), "left must be fp32"),
    (torch.zeros(4, 2).t(), torch.zeros(2, 4), "left must be contiguous"),
])
def test_native_lowrank_refuses_bad_factors(left, right, match):
    """fasterase._C called directly (the ops build valid factors): a k its CUDA kernel cannot hold, or factors
    of the wrong shape, dtype or layout, are refused before any memory is read."""
    with pytest.raises(RuntimeError, match=match):
        _dispatch.native().lowrank_update([torch.zeros(3, 4), torch.zeros(3, 4)], left, right)


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fasterase._C not built")
def test_native_shared_matmul_refuses_bad_shapes():
    native = _dispatch.native()
    with pytest.raises(RuntimeError, match=r"transform must be \(in, in\)"):
        native.shared_matmul([torch.zeros(3, 4)], torch.zeros(5, 5), [])
    with pytest.raises(RuntimeError, match="addends must be"):
        native.shared_matmul([torch.zeros(3, 4)], torch.eye(4), [torch.zeros(4, 3)])
    with pytest.raises(RuntimeError, match="one shape group"):
        native.shared_matmul([torch.zeros(3, 4), torch.zeros(2, 4)], torch.eye(4), [])


def test_closed_form_values_must_be_on_the_weights_device():
    w = torch.randn(4, 6)
    with pytest.raises(ValueError, match=r"values\[0\] is on meta, weights\[0\] on cpu"):
        ops.closed_form_update([w], torch.randn(2, 6), values=[torch.empty(2, 4, device="meta")])
    with pytest.raises(TypeError, match="floating-point"):
        ops.closed_form_update([w], torch.randn(2, 6), values=[torch.zeros(2, 4, dtype=torch.int64)])


@pytest.mark.parametrize("backend,device", [(b, "cpu") for b in CPU_BACKENDS if b == "cpp"] + [
    pytest.param(b, "cuda", marks=pytest.mark.gpu, id=f"{b}-cuda") for b in GPU_BACKENDS])
def test_closed_form_ignores_reduced_precision_matmul_settings(backend, device):
    """torch.set_float32_matmul_precision("medium") lets fp32 matmuls run in TF32 (cuBLAS, and cuBLASLt, which
    ignores torch's thread-local TF32 override) or bf16 (oneDNN on CPUs with avx512_bf16, as CI's): the
    closed form, specified in fp32, gives the same bits either way, and leaves the settings as they were."""
    if device == "cuda":
        require_built(backend)
    g = torch.Generator().manual_seed(7)
    # oneDNN takes bf16 only from about 256 x 256 x 256 up
    base = [torch.randn(300, 256, generator=g).to(device) for _ in range(2)]
    sources, targets = torch.randn(5, 256, generator=g), torch.randn(5, 256, generator=g)
    values = [torch.randn(5, 300, generator=g).to(device) for _ in range(2)]
    settings = [("highest", None), ("medium", None)] + ([("medium", "cublaslt")] if device == "cuda" else [])
    results = []
    before = torch.get_float32_matmul_precision()
    library = torch.backends.cuda.preferred_blas_library() if device == "cuda" else None
    try:
        for precision, blas in settings:
            torch.set_float32_matmul_precision(precision)
            if blas:
                torch.backends.cuda.preferred_blas_library(blas)
            set_to = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
            ws, vs = [w.clone() for w in base], [w.clone() for w in base]
            with ops.use_backend(backend):
                ops.closed_form_update(ws, sources, targets)
                ops.closed_form_update(vs, sources, values=values)
            assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == set_to
            results.append(ws + vs)
    finally:
        torch.set_float32_matmul_precision(before)
        if library is not None:
            torch.backends.cuda.preferred_blas_library(library)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
