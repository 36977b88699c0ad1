"""paired_noise_loss (forward + backward) against the eager composite a user would write."""
import pytest
import torch

from fasterase import ops
from op_testing import bench_backends

BATCH, SHAPE = 8, (64, 64, 64)  # FLUX-like: 4096 latent tokens x 64 channels per sample
NUMEL = BATCH * 64 * 64 * 64
BYTES = NUMEL * 4 * 6  # read four predictions, write two gradients (fp32)


def inputs(device):
    g = torch.Generator().manual_seed(0)
    pc, pu, tc, tu = (torch.randn(BATCH, *SHAPE, generator=g).to(device) for _ in range(4))
    sign = torch.tensor([1.0, -1.0] * (BATCH // 2), device=device)
    weight = torch.full((BATCH,), 1.0 / BATCH, device=device)
    return pc.requires_grad_(), pu.requires_grad_(), tc, tu, sign, weight


def eager(pc, pu, tc, tu, sign, weight, eta=1.0):
    view = (-1,) + (1,) * (pc.dim() - 1)
    target = tu + (sign * eta).view(view) * (tc - tu)
    per_c = (pc - target).square().flatten(1).mean(1)
    per_u = (pu - tu).square().flatten(1).mean(1)
    return (weight * per_c).sum() + (weight * per_u).sum()


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def step(loss_fn, args, device):
    pc, pu = args[0], args[1]
    pc.grad = pu.grad = None
    loss_fn(*args).backward()
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", devices())
def test_eager_composite(measure, device):
    args = inputs(device)
    measure(lambda: step(eager, args, device), BYTES, op="paired_noise_loss", impl="eager composite + autograd",
            device=device, elements=NUMEL)


@pytest.mark.parametrize("device,backend", bench_backends())
def test_fused(measure, device, backend):
    args = inputs(device)

    def fused(pc, pu, tc, tu, sign, weight):
        return ops.paired_noise_loss(pc, pu, tc, tu, sign, 1.0, weight=weight, uncond_weight=weight)

    with ops.use_backend(backend):
        step(fused, args, device)
        measure(lambda: step(fused, args, device), BYTES, op="paired_noise_loss",
                impl=f"fused ({ops.last_backend('paired_noise_loss')})", device=device, elements=NUMEL)
