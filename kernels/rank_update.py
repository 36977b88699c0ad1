"""Batched low-rank and shared-transform updates of many same-shape weights in one Triton launch.

Weights are reached through a device table of data pointers, so separate module parameters are
updated in place without stacking them first.  Grid axis 0 numbers a weight's tiles (up to 2^31 - 1)
and axis 1 the weight; axis 1 stops at 65535, so larger groups are launched in slices of that many."""
import torch
import triton
import triton.language as tl

from ._rounding import to_storage

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2


def _slices(count):
    """[start, stop) ranges of at most MAX_GRID_Y weights covering ``count``."""
    return [(s, min(s + MAX_GRID_Y, count)) for s in range(0, count, MAX_GRID_Y)]


def _pointer_table(tensors, device):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=device)


@triton.jit
def _lowrank_kernel(table_ptr, left_ptr, right_ptr, rows, cols, k, PER_WEIGHT: tl.constexpr,
                    DTYPE: tl.constexpr, K_PAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # fp32 products in IEEE precision (tl.dot would otherwise take TF32 on a GPU)
    w = tl.program_id(1)
    w_ptr = tl.load(table_ptr + w).to(tl.pointer_type(DTYPE))
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    kk = tl.arange(0, K_PAD)
    if PER_WEIGHT:
        left_ptr += w.to(tl.int64) * k * cols
        right_ptr += w.to(tl.int64) * k * cols
    dots = tl.zeros((BLOCK_R, K_PAD), dtype=tl.float32)  # W @ left^T for this block's rows
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tile = tl.load(w_ptr + r[:, None].to(tl.int64) * cols + c[None, :],
                       mask=(r[:, None] < rows) & (c[None, :] < cols), other=0.0).to(tl.float32)
        lt = tl.load(left_ptr + kk[None, :] * cols + c[:, None], mask=(kk[None, :] < k) & (c[:, None] < cols),
                     other=0.0)  # (BLOCK_C, K_PAD): left^T
        dots += tl.dot(tile, lt, input_precision="ieee")
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        offs = r[:, None].to(tl.int64) * cols + c[None, :]
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        tile = tl.load(w_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        rt = tl.load(right_ptr + kk[:, None] * cols + c[None, :], mask=(kk[:, None] < k) & (c[None, :] < cols), other=0.0)
        tile += tl.dot(dots, rt, input_precision="ieee")
        tl.store(w_ptr + offs, to_storage(tile, DTYPE), mask=inside)


def lowrank_update(weights, left, right):
    """W += (W @ left^T) @ right for one shape group (fasterase.ops.rank_update reference)."""
    rows, cols = weights[0].shape
    k = left.shape[-2]
    k_pad = max(16, triton.next_power_of_2(k))  # tl.dot needs every dimension >= 16
    table = _pointer_table(weights, weights[0].device)
    per_weight = left.dim() == 3
    for start, stop in _slices(len(weights)):
        _lowrank_kernel[(triton.cdiv(rows, 16), stop - start)](
            table[start:stop], left[start:stop] if per_weight else left, right[start:stop] if per_weight else right,
            rows, cols, k, PER_WEIGHT=per_weight, DTYPE=_TL_DTYPES[weights[0].dtype], K_PAD=k_pad, BLOCK_R=16,
            BLOCK_C=32)


@triton.jit
def _shared_matmul_kernel(table_ptr, add_table_ptr, t_ptr, out_ptr, rows, cols, HAS_ADD: tl.constexpr,
                          DTYPE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    w = tl.program_id(1)
    w_ptr = tl.load(table_ptr + w).to(tl.pointer_type(DTYPE))
    col_tiles = tl.cdiv(cols, BN)
    r = (tl.program_id(0) // col_tiles) * BM + tl.arange(0, BM)
    c = (tl.program_id(0) % col_tiles) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, cols, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(w_ptr + r[:, None].to(tl.int64) * cols + kk[None, :],
                    mask=(r[:, None] < rows) & (kk[None, :] < cols), other=0.0).to(tl.float32)
        b = tl.load(t_ptr + kk[:, None] * cols + c[None, :], mask=(kk[:, None] < cols) & (c[None, :] < cols), other=0.0)
        acc += tl.dot(a, b, input_precision="ieee")
    offs = r[:, None].to(tl.int64) * cols + c[None, :]
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    if HAS_ADD:
        add_ptr = tl.load(add_table_ptr + w).to(tl.pointer_type(tl.float32))
        acc += tl.load(add_ptr + offs, mask=inside, other=0.0)
    tl.store(out_ptr + w.to(tl.int64) * rows * cols + offs, acc, mask=inside)


def shared_matmul(weights, transform, addends):
    """W <- W @ T (+ addend) for one shape group; results go through an fp32 scratch because
    every output tile reads whole rows of the old W."""
    rows, cols = weights[0].shape
    device = weights[0].device
    scratch = torch.empty((len(weights), rows, cols), dtype=torch.float32, device=device)
    table = _pointer_table(weights, device)
    add_table = _pointer_table(addends, device) if addends else table
    tiles = triton.cdiv(rows, 32) * triton.cdiv(cols, 32)
    for start, stop in _slices(len(weights)):
        _shared_matmul_kernel[(tiles, stop - start)](
            table[start:stop], add_table[start:stop], transform, scratch[start:stop], rows, cols,
            HAS_ADD=bool(addends), DTYPE=_TL_DTYPES[weights[0].dtype], BM=32, BN=32, BK=32)
    torch._foreach_copy_(weights, list(scratch.unbind(0)))
