"""rank_one_update / closed_form_update over every cross-attention K/V of an SD1.5-sized UNet, against
the per-module Python loop a user would otherwise run (torch.inverse per module, as public UCE code does)."""
import pytest
import torch

from fasterase import ops
from op_testing import bench_backends

# SD1.5 cross-attention to_k/to_v: 16 attention blocks x 2, input width 768
OUTS = [320] * 10 + [640] * 10 + [1280] * 12
WIDTH, CONCEPTS, LAM = 768, 64, 0.1


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def setup(device):
    g = torch.Generator().manual_seed(0)
    weights = [(torch.randn(o, WIDTH, generator=g) / WIDTH ** 0.5).to(device) for o in OUTS]
    sources = torch.randn(CONCEPTS, WIDTH, generator=g).to(device)
    targets = torch.randn(CONCEPTS, WIDTH, generator=g).to(device)
    return weights, sources, targets


def restorer(weights):
    """Setup for every round: put the original weights back, so repeated edits cannot blow them up."""
    saved = [w.clone() for w in weights]

    def restore():
        for w, s in zip(weights, saved):
            w.copy_(s)

    return restore


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def weight_bytes(weights):
    return sum(w.numel() * w.element_size() * 2 for w in weights)


def per_module_closed_form(weights, sources, targets):
    for w in weights:
        values = w @ targets.t()                     # v_i = W c*_i
        mat1 = LAM * w + values @ sources            # lam W + sum v_i c_i^T
        mat2 = LAM * torch.eye(WIDTH, device=w.device) + sources.t() @ sources
        w.copy_(mat1 @ torch.inverse(mat2))


@pytest.mark.parametrize("device", devices())
def test_closed_form_per_module_loop(measure, device):
    weights, c, cs = setup(device)
    measure(lambda: (per_module_closed_form(weights, c, cs), sync(device)), weight_bytes(weights), rounds=3,
            setup=restorer(weights),
            op="closed_form", impl="per-module loop + torch.inverse", device=device, elements=sum(w.numel() for w in weights))


@pytest.mark.parametrize("device,backend", bench_backends())
def test_closed_form_shared_inverse(measure, device, backend):
    weights, c, cs = setup(device)
    with ops.use_backend(backend):
        measure(lambda: (ops.closed_form_update(weights, c, cs, lam=LAM), sync(device)), weight_bytes(weights),
                rounds=3, setup=restorer(weights), op="closed_form",
                impl=f"closed_form_update ({backend or ops.default_backend(device)})", device=device,
                elements=sum(w.numel() for w in weights))


def per_module_rank_one(weights, e_u, e_w, eta=0.5):
    for w in weights:
        w.add_(eta * torch.outer(w @ e_u - w @ e_w, e_w) / e_w.dot(e_w))


@pytest.mark.parametrize("device", devices())
def test_rank_one_per_module_loop(measure, device):
    weights, c, cs = setup(device)
    measure(lambda: (per_module_rank_one(weights, c[0], cs[0]), sync(device)), weight_bytes(weights),
            setup=restorer(weights),
            op="rank_one_update", impl="per-module loop", device=device, elements=sum(w.numel() for w in weights))


@pytest.mark.parametrize("device,backend", bench_backends())
def test_rank_one_batched(measure, device, backend):
    weights, c, cs = setup(device)
    with ops.use_backend(backend):
        measure(lambda: (ops.rank_one_update(weights, c[0], cs[0], eta=0.5), sync(device)), weight_bytes(weights),
                setup=restorer(weights), op="rank_one_update",
                impl=f"rank_one_update ({backend or ops.default_backend(device)})", device=device,
                elements=sum(w.numel() for w in weights))
