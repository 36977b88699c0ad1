"""fp32 -> bf16 conversion of every backend, bit for bit against torch's x.to(torch.bfloat16): ties to even,
one bit either side of a tie, values that round up to inf, subnormals, signed zeros, inf and NaN.

The op tests' tolerances allow one rounding of the output dtype, so a kernel that truncated instead of
rounding to nearest even could hide there; this holds each conversion to the exact bits."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fasterase.kernels is first imported

from fasterase import ops  # noqa: E402
from op_testing import GPU_BACKENDS, fast_backends, require_built  # noqa: E402

CPU_BACKENDS = fast_backends("cpu")
if "triton" in CPU_BACKENDS:
    import triton
    import triton.language as tl

    from fasterase.kernels._rounding import to_storage

    @triton.jit
    def _convert(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + o, to_storage(tl.load(x_ptr + o, mask=o < n), tl.bfloat16), mask=o < n)
BACKENDS = [(b, "cpu") for b in ["reference"] + CPU_BACKENDS] + [
    pytest.param(b, "cuda", marks=pytest.mark.gpu, id=f"{b}-cuda") for b in GPU_BACKENDS]


def finite_patterns() -> torch.Tensor:
    """fp32 values (both signs) whose upper halves are edge cases (zero/subnormal, smallest normal, 1,
    the largest finite bf16 0x7F7F, whose round-up is inf) and 64 random ones, each with the lower halves
    0, 1, 0x7FFF, 0x8000 (a tie: to even), 0x8001 and 0xFFFF."""
    g = torch.Generator().manual_seed(0)
    upper = torch.cat([torch.tensor([0x0000, 0x0001, 0x007F, 0x0080, 0x3F80, 0x3F81, 0x7F7E, 0x7F7F]),
                       torch.randint(0, 0x7F80, (64,), generator=g)])
    lower = torch.tensor([0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    bits = (upper[:, None] << 16 | lower[None, :]).reshape(-1)
    bits = torch.cat([bits, bits | (1 << 31)])
    return bits.to(torch.int64).to(torch.int32, copy=True).view(torch.float32)  # wraps the sign bit in


def special_patterns() -> torch.Tensor:
    """+-inf and NaNs whose rounding add would carry (0x7FFFFFFF: into the sign) or drop the payload
    (0x7F800001: a signalling NaN), quiet and signalling, both signs."""
    bits = torch.tensor([0x7F800000, 0x7F800001, 0x7F807FFF, 0x7F808000, 0x7FBFFFFF, 0x7FC00000, 0x7FC08000,
                         0x7FFF8000, 0x7FFFFFFF], dtype=torch.int64)
    bits = torch.cat([bits, bits | (1 << 31)])
    return bits.to(torch.int32).view(torch.float32)


def assert_same_bf16(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    """out == x.to(bf16) bit for bit, except that any NaN may stand for any NaN (torch itself writes 0xFFFF
    on vectorised paths and 0x7FC0 on scalar ones)."""
    want = x.to(torch.bfloat16)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(out.cpu()), nan), f"{what}: NaN where torch has none, or the reverse"
    got_bits, want_bits = out.cpu().view(torch.int16)[~nan], want.view(torch.int16)[~nan]
    bad = (got_bits != want_bits).nonzero().view(-1)
    if bad.numel():
        i = int(bad[0])
        raise AssertionError(f"{what}: {bad.numel()} values rounded unlike torch, e.g. fp32 "
                             f"{hex(x[~nan][i].view(torch.int32).item() & 0xFFFFFFFF)} -> "
                             f"{hex(got_bits[i].item() & 0xFFFF)}, torch {hex(want_bits[i].item() & 0xFFFF)}")


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="triton not installed")
def test_triton_to_storage_rounds_like_torch():
    """kernels/_rounding.py on its own, for every pattern (it is what every Triton kernel stores bf16 with)."""
    x = torch.cat([finite_patterns(), special_patterns()])
    y = torch.empty(x.shape, dtype=torch.bfloat16)
    _convert[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    assert_same_bf16(y, x, "triton to_storage")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_paired_loss_gradients_round_like_torch(backend, device):
    """bf16 predictions with fp32 teachers: with pred 0, uncond teacher 0, sign 1, eta 1 and a weight that
    makes 2 w / N exactly 1, the conditional gradient is 0 - (0 + (teacher_cond - 0)) in fp32 (-teacher_cond,
    but +0 for both zeros) before it is stored in bf16, so every pattern, NaN and inf included, reaches the
    kernel's conversion unchanged."""
    if device == "cuda":
        require_built(backend)
    x = torch.cat([finite_patterns(), special_patterns()])
    n = 1024
    x = torch.nn.functional.pad(x, (0, n - x.numel()))[None].to(device)
    zeros = torch.zeros(1, n, device=device)
    one = torch.ones(1, device=device)
    with ops.use_backend(backend):
        _, grad, _ = torch.ops.fasterase.paired_noise_loss(zeros.bfloat16(), None, x, zeros, one, one * (n / 2),
                                                           one, 1.0)
    expected = 0.0 - (0.0 + 1.0 * (x.cpu() - 0.0))  # the kernels' fp32 arithmetic, exact here
    assert_same_bf16(grad, expected, f"{backend} paired loss gradient")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_adamw_bf16_state_rounds_like_torch(backend, device):
    """With beta1 = 0 the new first moment is 1 * grad exactly (from -0.0, which keeps the gradient's zero
    sign), so an fp32 gradient reaches the bf16 state store unchanged: every finite pattern (non-finite
    gradients skip the step)."""
    if device == "cuda":
        require_built(backend)
    x = finite_patterns().to(device)
    n = x.numel()
    exp_avg = torch.full((n,), -0.0, dtype=torch.bfloat16, device=device)
    with ops.use_backend(backend):
        found = ops.masked_adamw(torch.zeros(n, device=device), x, exp_avg,
                                 torch.zeros(n, dtype=torch.bfloat16, device=device), torch.zeros(1, device=device),
                                 lr=0.0, betas=(0.0, 0.5), weight_decay=0.0)
    assert found.item() == 0
    assert_same_bf16(exp_avg, x.cpu(), f"{backend} masked_adamw exp_avg")
