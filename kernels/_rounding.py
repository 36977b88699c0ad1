"""fp32 -> storage dtype conversion with round-to-nearest-even, also under TRITON_INTERPRET
(whose bf16 cast does not round to nearest), so every backend rounds like torch."""
import triton
import triton.language as tl


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        # the rounding add would make some NaNs numbers (0x7FFFFFFF carries into the sign: -0.0; 0x7F800001
        # loses its payload: inf), so a NaN becomes the quiet NaN 0x7FC0 (torch's scalar conversion's)
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
