"""masked_adamw / SalientAdamW against what a user would otherwise run: torch AdamW (foreach on CPU,
fused on GPU) and bitsandbytes AdamW8bit.  One optimizer step over an SD-like set of tensors."""
import pytest
import torch

from fasterase import ops
from fasterase.optim import SalientAdamW
from op_testing import bench_backends

# 24 tensors, 8M elements: a slice of a UNet's attention/MLP weights
SHAPES = [(320, 320)] * 8 + [(640, 640)] * 8 + [(1280, 640)] * 8
NUMEL = sum(a * b for a, b in SHAPES)
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
# bytes per trained element: param r/w + grad r + two states r/w
BYTES_FP32 = 4 * 2 + 4 + 2 * 4 * 2
BYTES_8BIT = 4 * 2 + 4 + 2 * 1 * 2


def params_with_grads(device, density=None):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-2
    masks = None
    if density is not None:
        masks = {p: torch.rand(p.shape, generator=g).to(device) < density for p in params}
    return params, masks


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", devices())
def test_torch_adamw(measure, device):
    params, _ = params_with_grads(device)
    kind = dict(fused=True) if device == "cuda" else dict(foreach=True)
    opt = torch.optim.AdamW(params, **HYPER, **kind)
    measure(lambda: (opt.step(), sync(device)), NUMEL * BYTES_FP32, op="masked_adamw", impl=f"torch.optim.AdamW {kind}",
            device=device, elements=NUMEL)


@pytest.mark.parametrize("state_dtype,bytes_per", [("fp32", BYTES_FP32), ("8bit", BYTES_8BIT)])
@pytest.mark.parametrize("device,backend", bench_backends())
def test_salient_adamw_dense(measure, device, backend, state_dtype, bytes_per):
    params, _ = params_with_grads(device)
    opt = SalientAdamW(params, state_dtype=state_dtype, **HYPER)
    with ops.use_backend(backend):
        opt.step()
        measure(lambda: (opt.step(), sync(device)), NUMEL * bytes_per, op="masked_adamw",
                impl=f"SalientAdamW {state_dtype} ({ops.last_backend('masked_adamw_multi')})", device=device,
                elements=NUMEL)


@pytest.mark.parametrize("device,backend", bench_backends())
def test_salient_adamw_8bit_one_percent_mask(measure, device, backend):
    params, masks = params_with_grads(device, density=0.01)
    opt = SalientAdamW(params, masks=masks, **HYPER)
    selected = sum(int(m.sum()) for m in masks.values())
    with ops.use_backend(backend):
        opt.step()
        # the step still reads every gradient once for the global non-finite check
        measure(lambda: (opt.step(), sync(device)), selected * BYTES_8BIT + NUMEL * 4, op="masked_adamw",
                impl=f"SalientAdamW 8bit, 1% index mask ({ops.last_backend('masked_adamw_multi')})", device=device,
                elements=NUMEL)


@pytest.mark.parametrize("device", devices())
def test_bitsandbytes_adamw8bit(measure, device):
    bnb = pytest.importorskip("bitsandbytes")
    params, _ = params_with_grads(device)
    opt = bnb.optim.AdamW8bit(params, **HYPER)
    opt.step()
    measure(lambda: (opt.step(), sync(device)), NUMEL * BYTES_8BIT, op="masked_adamw", impl="bitsandbytes AdamW8bit",
            device=device, elements=NUMEL)


@pytest.mark.gpu
def test_copy_bandwidth(measure):
    src = torch.empty(1 << 26, device="cuda")
    dst = torch.empty_like(src)
    measure(lambda: dst.copy_(src), src.numel() * 8, calls=20, op="copy", impl="device copy", device="cuda",
            elements=src.numel())


def sd15_unet_shapes():
    """Every parameter shape of SD1.5's UNet (859.5M parameters): diffusers' UNet2DConditionModel with
    SD1.5's config (its defaults, cross-attention width 768), built on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    return [tuple(p.shape) for p in unet.parameters()]


@pytest.fixture(scope="module")
def sd15_params():
    shapes = sd15_unet_shapes()
    torch.manual_seed(0)
    params = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-2
    return params


def sd15_optimizers():
    yield "torch.optim.AdamW fused", lambda ps: torch.optim.AdamW(ps, **HYPER, fused=True)
    yield "bitsandbytes AdamW8bit", lambda ps: pytest.importorskip("bitsandbytes").optim.AdamW8bit(ps, **HYPER)
    for backend in ("cuda", "triton"):
        yield f"SalientAdamW 8bit ({backend})", lambda ps, b=backend: (b, SalientAdamW(ps, **HYPER))


@pytest.mark.gpu
@pytest.mark.parametrize("name,make", list(sd15_optimizers()), ids=lambda x: x if isinstance(x, str) else "")
def test_sd15_unet_step(measure, sd15_params, name, make):
    """One optimizer step over every tensor of an SD1.5-sized UNet (the issue's 2x-bitsandbytes goal)."""
    made = make(sd15_params)
    backend, opt = made if isinstance(made, tuple) else (None, made)
    numel = sum(p.numel() for p in sd15_params)
    bytes_per = BYTES_FP32 if "fused" in name else BYTES_8BIT
    with ops.use_backend(backend):
        opt.step()
        measure(lambda: (opt.step(), sync("cuda")), numel * bytes_per, op="masked_adamw SD1.5 UNet", impl=name,
                device="cuda", elements=numel, tensors=len(sd15_params))
    del opt
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("mask", ["none", "bits 100%"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_masked_adamw_8bit_64m(measure, backend, mask):
    """One flat 64M-element tensor, fp32 params, 8-bit states: the bandwidth goal (>= 85% of a copy).
    Bytes moved: the update's 16 per entry, the non-finite check's second read of the gradient (4), and
    the bitmask, read by both passes."""
    n = 1 << 26
    torch.manual_seed(0)
    param, grad = torch.randn(n, device="cuda"), torch.randn(n, device="cuda") * 1e-2
    m, v = torch.zeros(n, dtype=torch.uint8, device="cuda"), torch.zeros(n, dtype=torch.uint8, device="cuda")
    absmax = (torch.zeros(ops.num_blocks(n), device="cuda"), torch.zeros(ops.num_blocks(n), device="cuda"))
    step = torch.zeros(1, device="cuda")
    bits = ops.pack_mask(torch.ones(n, dtype=torch.bool, device="cuda")) if mask != "none" else None
    extra = 2 * (n // 8) if bits is not None else 0
    with ops.use_backend(backend):
        def one():
            ops.masked_adamw(param, grad, m, v, step, mask=bits, absmax=absmax, **HYPER)

        one()
        measure(one, n * (BYTES_8BIT + 4) + extra, calls=20, op="masked_adamw 64M 8-bit", impl=f"{backend}, mask {mask}",
                device="cuda", elements=n)
