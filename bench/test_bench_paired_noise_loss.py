"""paired_noise_loss (forward + backward) against the eager composite a user would write."""
import pytest
import torch

from fasterase import ops
from op_testing import bench_backends

# FLUX-like: 8 samples of 4096 latent tokens x 64 channels (2M elements: host overhead dominates on a
# GPU); and on a GPU, 64M elements, where both versions are bound by memory traffic.
SIZES = {"flux batch": (8, (64, 64, 64)), "64M": (16, (16, 512, 512))}


def numel(size):
    batch, shape = SIZES[size]
    return batch * shape[0] * shape[1] * shape[2]


def moved_bytes(size):
    return numel(size) * 4 * 6  # read four predictions, write two gradients (fp32)


def inputs(device, size):
    batch, shape = SIZES[size]
    g = torch.Generator(device=device).manual_seed(0)
    pc, pu, tc, tu = (torch.randn(batch, *shape, generator=g, device=device) for _ in range(4))
    sign = torch.tensor([1.0, -1.0] * (batch // 2), device=device)
    weight = torch.full((batch,), 1.0 / batch, device=device)
    return pc.requires_grad_(), pu.requires_grad_(), tc, tu, sign, weight


def eager(pc, pu, tc, tu, sign, weight, eta=1.0):
    view = (-1,) + (1,) * (pc.dim() - 1)
    target = tu + (sign * eta).view(view) * (tc - tu)
    per_c = (pc - target).square().flatten(1).mean(1)
    per_u = (pu - tu).square().flatten(1).mean(1)
    return (weight * per_c).sum() + (weight * per_u).sum()


def cases():
    """(device, size) pairs: the FLUX batch everywhere, 64M elements on a GPU only."""
    return [("cpu", "flux batch")] + ([("cuda", s) for s in SIZES] if torch.cuda.is_available() else [])


def step(loss_fn, args):
    pc, pu = args[0], args[1]
    pc.grad = pu.grad = None
    loss_fn(*args).backward()


def calls(device):
    return 10 if device == "cuda" else 1


@pytest.mark.parametrize("device,size", cases())
def test_eager_composite(measure, device, size):
    args = inputs(device, size)
    measure(lambda: step(eager, args), moved_bytes(size), calls=calls(device), op=f"paired_noise_loss {size}",
            impl="eager composite + autograd", device=device, elements=numel(size))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("device,backend", bench_backends())
def test_fused(measure, device, backend, size):
    if device == "cpu" and size != "flux batch":
        pytest.skip("64M elements: GPU only")
    args = inputs(device, size)

    def fused(pc, pu, tc, tu, sign, weight):
        return ops.paired_noise_loss(pc, pu, tc, tu, sign, 1.0, weight=weight, uncond_weight=weight)

    with ops.use_backend(backend):
        step(fused, args)
        measure(lambda: step(fused, args), moved_bytes(size), calls=calls(device), op=f"paired_noise_loss {size}",
                impl=f"fused ({ops.last_backend('paired_noise_loss')})", device=device, elements=numel(size))
