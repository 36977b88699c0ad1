"""fp32 -> storage dtype conversion with round-to-nearest-even, also under TRITON_INTERPRET
(whose bf16 cast does not round to nearest), so every backend rounds like torch."""
import triton
import triton.language as tl


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        return u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
