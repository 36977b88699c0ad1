"""paired_noise_loss: backends against the reference, autograd, and the ANT/ESD semantics."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fasterase.kernels is first imported

from fasterase import ops  # noqa: E402
from op_testing import (GPU_BACKENDS, assert_close_to_reference, assert_update_close, fast_backends,  # noqa: E402
                        require_built)

CPU_BACKENDS = fast_backends("cpu")
# (batch, per-sample shape): totals 1, 255, 256, 257, 4097 and ~1e5 elements
SHAPES = [(1, (1,)), (1, (255,)), (2, (2, 8, 8)), (1, (257,)), (17, (241,)), (4, (4, 80, 80))]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(batch, shape, dtype, with_uncond, device, seed, dtypes=None):
    """Random inputs; ``dtypes`` (pred_cond, pred_uncond, teachers) overrides the one ``dtype`` of all four."""
    g = torch.Generator().manual_seed(seed)
    pc, pu, te = dtypes if dtypes is not None else (dtype, dtype, dtype)
    t = [torch.randn(batch, *shape, generator=g).to(device=device, dtype=d) for d in (pc, pu, te, te)]
    sign = (torch.randint(0, 2, (batch,), generator=g) * 2 - 1).float().to(device)
    weight = torch.rand(batch, generator=g).to(device)
    uncond_weight = torch.rand(batch, generator=g).to(device)
    return (t[0], t[1] if with_uncond else None, t[2], t[3], sign, weight, uncond_weight, 0.8)


def check(backend, batch, shape, dtype, with_uncond, device="cpu", dtypes=None):
    args = make(batch, shape, dtype, with_uncond, device, seed=batch * 100 + shape[-1], dtypes=dtypes)
    with ops.use_backend("reference"):
        ref = torch.ops.fasterase.paired_noise_loss(*args)
    with ops.use_backend(backend):
        out = torch.ops.fasterase.paired_noise_loss(*args)
    assert ops.last_backend("paired_noise_loss") == backend
    oracle = ops.paired_noise_loss_reference(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                                               and a.dim() > 1 else a for a in args])
    names = ("loss", "grad_cond", "grad_uncond")
    for name, o, r, x in zip(names, out, ref, oracle):
        if name == "grad_uncond" and not with_uncond:
            assert o.numel() == 0
            continue
        assert o.dtype == r.dtype and o.shape == r.shape
        if name == "loss":  # a sum: the max-error rule (its summation order is the backend's own)
            assert_close_to_reference(o, r, x, f"{backend} {name} {dtype}")
        else:  # element-wise: held per element, to one rounding of its dtype
            assert_update_close(o.cpu(), r.cpu(), x.cpu(), name=f"{backend} {name} {dtypes or dtype}")


@pytest.mark.parametrize("with_uncond", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,shape", SHAPES)
@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="fasterase._C not built")
def test_cpp_matches_reference(batch, shape, dtype, with_uncond):
    check("cpp", batch, shape, dtype, with_uncond)


@pytest.mark.parametrize("with_uncond", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,shape", SHAPES[:5] + [(2, (4100,))])  # the last: 3 chunks of 2048 per sample
@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_interpreted_matches_reference(batch, shape, dtype, with_uncond):
    check("triton", batch, shape, dtype, with_uncond)


# every accepted mix: each prediction its own dtype, the two teachers one dtype (tested refused otherwise)
MIXES = [(pc, pu, te) for pc in DTYPES for pu in DTYPES for te in DTYPES if not pc == pu == te]


@pytest.mark.parametrize("pc,pu,te", MIXES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_mixed_dtypes_match_reference(backend, pc, pu, te):
    shape = (2, (3, 7)) if backend == "triton" else (3, (5, 700))
    check(backend, *shape, None, True, dtypes=(pc, pu, te))


@pytest.mark.gpu
@pytest.mark.parametrize("pc,pu,te", MIXES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_mixed_dtypes_match_reference(backend, pc, pu, te):
    require_built(backend)
    check(backend, 3, (5, 700), None, True, device="cuda", dtypes=(pc, pu, te))


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_mixed_teacher_dtypes_are_refused_alike(backend):
    """One rule for every backend: the native kernels take one teacher dtype, so a mix is refused before
    any backend runs, naming both dtypes."""
    pc, tc = torch.zeros(2, 3), torch.zeros(2, 3)
    with ops.use_backend(backend), pytest.raises(TypeError, match=r"teacher_cond \(torch.float32\) and "
                                                               r"teacher_uncond \(torch.bfloat16\) must share"):
        ops.paired_noise_loss(pc, None, tc, tc.bfloat16(), 1.0)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_strided_predictions_give_contiguous_gradients(backend):
    """The op called directly with predictions laid out transposed in memory (the same values) beside
    contiguous teachers: backends that read flat buffers make them contiguous first, and every backend
    returns contiguous gradients of the same values."""
    args = make(3, (5, 6), torch.float32, True, "cpu", seed=9)
    strided = list(args)
    for i in (0, 1):
        strided[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2)
        assert torch.equal(strided[i], args[i]) and not strided[i].is_contiguous()
    with ops.use_backend("reference"):
        ref = torch.ops.fasterase.paired_noise_loss(*args)
    with ops.use_backend(backend):
        out = torch.ops.fasterase.paired_noise_loss(*strided)
    for o, r in zip(out[1:], ref[1:]):
        assert o.is_contiguous() and o.shape == r.shape
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    torch.testing.assert_close(out[0], ref[0], rtol=1e-6, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("with_uncond", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,shape", SHAPES + [(8, (16, 128, 128))])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_match_reference(backend, batch, shape, dtype, with_uncond):
    require_built(backend)
    check(backend, batch, shape, dtype, with_uncond, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_take_more_samples_than_a_grid_axis_holds(backend):
    """70000 samples (grid axes 1 and 2 stop at 65535): every sample's gradients and loss term."""
    require_built(backend)
    check(backend, 70000, (16,), torch.float32, True, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_launch_on_the_tensors_gpu(backend):
    """Tensors on cuda:1 while cuda:0 is current: the kernels launch on the tensors' GPU."""
    require_built(backend)
    with torch.cuda.device(0):
        check(backend, 4, (4, 80, 80), torch.bfloat16, True, device="cuda:1")


@pytest.mark.parametrize("scale", [1.0, 3.0])  # loss.backward() (stored gradients returned as they are), and a scaled seed
@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_autograd_matches_eager_composite(backend, scale):
    """Gradients through the fused loss equal autograd through the plain formula (ANT eq. 3 weights)."""
    g = torch.Generator().manual_seed(0)
    pc, pu, tc, tu = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(4))
    sign = torch.tensor([1.0, -1.0])  # early sample keeps, late sample reverses
    eta, lam1, lam2, lam3 = 1.5, 0.7, 0.2, 0.3
    a_c, a_u = pc.float().requires_grad_(), pu.float().requires_grad_()
    with ops.use_backend(backend):
        loss = ops.paired_noise_loss(a_c, a_u, tc.float(), tu.float(), sign, eta,
                                     weight=torch.tensor([1.0, lam1]), uncond_weight=torch.tensor([lam2, lam3]))
    (scale * loss).backward()
    b_c, b_u = pc.clone().requires_grad_(), pu.clone().requires_grad_()
    mse = torch.nn.functional.mse_loss
    expected = (mse(b_c[0], tu[0] + eta * (tc[0] - tu[0])) + lam1 * mse(b_c[1], tu[1] - eta * (tc[1] - tu[1]))
                + lam2 * mse(b_u[0], tu[0]) + lam3 * mse(b_u[1], tu[1]))
    (scale * expected).backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_c.grad.double(), b_c.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a_u.grad.double(), b_u.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference"] + CPU_BACKENDS)
def test_backward_twice_accumulates(backend):
    """The stored gradients handed to autograd as they are must not be changed by accumulation."""
    g = torch.Generator().manual_seed(4)
    pc, pu, tc, tu = (torch.randn(2, 3, 5, generator=g) for _ in range(4))
    a_c, a_u = pc.clone().requires_grad_(), pu.clone().requires_grad_()
    with ops.use_backend(backend):
        loss = ops.paired_noise_loss(a_c, a_u, tc, tu, sign=torch.tensor([1.0, -1.0]), eta=1.0)
    loss.backward(retain_graph=True)
    once_c, once_u = a_c.grad.clone(), a_u.grad.clone()
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(a_c.grad, 3 * once_c)
    torch.testing.assert_close(a_u.grad, 3 * once_u)


def test_defaults_are_mean_squared_errors():
    g = torch.Generator().manual_seed(2)
    pc, pu, tc, tu = (torch.randn(3, 5, generator=g) for _ in range(4))
    loss = ops.paired_noise_loss(pc, pu, tc, tu, sign=-1.0, eta=2.0)
    mse = torch.nn.functional.mse_loss
    torch.testing.assert_close(loss, mse(pc, tu - 2.0 * (tc - tu)) + mse(pu, tu))
    esd = ops.paired_noise_loss(pc, None, tc, tu, sign=-1.0, eta=2.0)  # ESD: conditional branch only
    torch.testing.assert_close(esd, mse(pc, tu - 2.0 * (tc - tu)))


@pytest.mark.parametrize("call,match", [
    (lambda: ops.paired_noise_loss(torch.zeros(2, 3), None, torch.zeros(2, 4), torch.zeros(2, 3), 1.0), "shape"),
    (lambda: ops.paired_noise_loss(torch.zeros(2, 3), None, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3)), "sign"),
    (lambda: ops.paired_noise_loss(torch.zeros(2, 3, dtype=torch.int64), None, torch.zeros(2, 3),
                                   torch.zeros(2, 3), 1.0), "dtype"),
])
def test_bad_input_is_explained(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_fake_impl():
    args = make(2, (3, 4), torch.float32, True, "cpu", 0)
    torch.library.opcheck(torch.ops.fasterase.paired_noise_loss.default, args,
                          test_utils=("test_schema", "test_faketensor"))
