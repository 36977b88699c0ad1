// CUDA masked AdamW over a list of tensors in three launches, however many tensors: a check of the
// gradients, a per-tensor step (advance t, bias corrections), and one update launch per dtype group.
// Semantics: fasterase/ops/adamw.py. Each launch walks a flat index space (check chunks, 256-entry
// state blocks) that spans every tensor; a block walks the task list forward as its index grows.
//
// The update is memory-bound (16 bytes per fp32 entry with 8-bit states), so it is shaped for
// bandwidth: one warp per 256-entry state block, each lane with 8 entries in flight, and no block-wide
// barrier in the loop (the block's absmax is a warp reduction), so warps stream independently.
// Encoding an 8-bit code is the costly part (a binary search of 8 dependent steps per value), so each
// block first tabulates, per cell of the float line (sign, exponent and top 7 mantissa bits of the
// value), how many code midpoints lie below the cell; a value then needs one table read and at most
// one midpoint comparison, since no cell holds more than one midpoint of either map
// (tests/test_ops_masked_adamw.py::test_code_cells_hold_at_most_one_midpoint); two are made for margin.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"

namespace fasterase {
namespace cuda {
namespace {

constexpr int kBlock = 256;                // state entries per block (the 8-bit absmax block)
constexpr int kPerLane = kBlock / 32;      // one warp per state block
constexpr int kWarps = 4;                  // warps per thread block
constexpr int kCheckThreads = 256;

// Advances k to the last task whose first index (block or chunk) is <= x. A grid-stride loop visits
// increasing x, so each block scans the task list once in all; tasks with no index are passed over.
template <bool kChunks>
__device__ __forceinline__ int next_task(const AdamWTask* tasks, int count, int k, int64_t x) {
  while (k + 1 < count && (kChunks ? tasks[k + 1].first_chunk : tasks[k + 1].first_block) <= x) ++k;
  return k;
}

// State entry j -> param index *i; whether it is selected.
__device__ __forceinline__ bool select(const AdamWArgs& a, int64_t j, int64_t* i) {
  *i = a.mask_idx ? static_cast<int64_t>(a.mask_idx[j]) : j;
  return a.mask_bits == nullptr || ((a.mask_bits[*i >> 3] >> (*i & 7)) & 1);
}

__device__ __forceinline__ float load_f32(const void* p, int dtype, int64_t i) {
  return dtype == kF32 ? static_cast<const float*>(p)[i] : to_f32(static_cast<const __nv_bfloat16*>(p)[i]);
}

__global__ void check_kernel(const AdamWTask* tasks, int count, int64_t chunks, bool selected_only, float* found) {
  int k = 0;
  for (int64_t c = blockIdx.x; c < chunks; c += gridDim.x) {
    k = next_task<true>(tasks, count, k, c);
    const AdamWTask& t = tasks[k];
    const AdamWArgs& a = t.a;
    const int64_t start = (c - t.first_chunk) * kAdamWCheckChunk;
    const int64_t size = selected_only ? a.length : a.n;
    const int64_t end = start + kAdamWCheckChunk < size ? start + kAdamWCheckChunk : size;
    bool bad = false;
#pragma unroll 4
    for (int64_t j = start + threadIdx.x; j < end; j += kCheckThreads) {
      int64_t i = j;
      if (!selected_only || select(a, j, &i)) bad |= !isfinite(load_f32(a.grad, a.grad_dtype, i));
    }
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found = 1.f;
  }
}

// One thread per task: t = step + 1 and the bias corrections, in fp64 like the reference's Python floats.
__global__ void step_kernel(AdamWTask* tasks, int count, const float* found) {
  const int k = blockIdx.x * blockDim.x + threadIdx.x;
  if (k >= count || *found != 0.f) return;
  AdamWTask& t = tasks[k];
  const float step = *t.a.step + 1.f;
  *t.a.step = step;
  t.decay = static_cast<float>(1.0 - t.a.lr * t.a.weight_decay);
  t.step_size = static_cast<float>(-t.a.lr / (1.0 - pow(t.a.beta1, static_cast<double>(step))));
  t.bias2 = static_cast<float>(sqrt(1.0 - pow(t.a.beta2, static_cast<double>(step))));
}

// Cells of |x| in [0, 1]: cell 0 is [0, 2^-24) (no midpoint of either map is that small), then 128
// cells per binade for the 25 binades from 2^-24 up to 1.
constexpr int kCells = 1 + 25 * 128;
constexpr uint32_t kTinyBits = 103u << 23;  // 2^-24

struct CodeTable {
  float mids[256];          // mids[c] = (code[c-1] + code[c]) / 2, c = 1..255 (sorted)
  uint8_t below[2 * kCells];  // midpoints below the cell's lowest value: positive cells, then negative
};

__device__ __forceinline__ int cell_of(uint32_t magnitude_bits) {
  return magnitude_bits < kTinyBits ? 0 : 1 + static_cast<int>((magnitude_bits - kTinyBits) >> 16);
}

// The number of midpoints below y (the exact code of y, ties to the lower code).
__device__ __forceinline__ int count_below(const float* mids, float y) {
  int q = 0;
#pragma unroll
  for (int s = 128; s > 0; s >>= 1)
    if (mids[q + s] < y) q += s;
  return q;
}

__device__ void build_table(const float* code, CodeTable* t) {
  for (int c = threadIdx.x + 1; c < 256; c += blockDim.x) t->mids[c] = __fmul_rn(__fadd_rn(code[c - 1], code[c]), 0.5f);
  __syncthreads();
  for (int i = threadIdx.x; i < 2 * kCells; i += blockDim.x) {
    const int cell = i % kCells;
    // cell's magnitude range [lo, hi); a negative cell's values are (-hi, -lo]
    const uint32_t lo = cell == 0 ? 0u : kTinyBits + (static_cast<uint32_t>(cell - 1) << 16);
    const uint32_t hi = cell == 0 ? kTinyBits : lo + (1u << 16);
    const float lowest = i < kCells ? __uint_as_float(lo) : -__uint_as_float(hi);
    t->below[i] = static_cast<uint8_t>(count_below(t->mids, lowest));
  }
}

// Nearest code, ties to the lower one: the number of midpoints below x, for x in [-1, 1].
__device__ __forceinline__ uint8_t quantize(const CodeTable& t, float x) {
  const uint32_t bits = __float_as_uint(x);
  int q = t.below[(bits >> 31) * kCells + cell_of(bits & 0x7fffffffu)];
  if (q < 255 && t.mids[q + 1] < x) ++q;
  if (q < 255 && t.mids[q + 1] < x) ++q;
  return static_cast<uint8_t>(q);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

template <typename P, typename G, typename S, bool kEightBit>
__global__ void __launch_bounds__(kWarps * 32) update_kernel(const AdamWTask* tasks, int count, int64_t blocks,
                                                             const float* found, const float* qmap_m,
                                                             const float* qmap_v) {
  __shared__ CodeTable table_m, table_v;
  if (*found != 0.f) return;  // uniform across the grid
  if constexpr (kEightBit) {
    build_table(qmap_m, &table_m);
    build_table(qmap_v, &table_v);
    __syncthreads();
  }
  const int lane = threadIdx.x & 31;
  int k = 0;
  for (int64_t b = int64_t(blockIdx.x) * kWarps + (threadIdx.x >> 5); b < blocks; b += int64_t(gridDim.x) * kWarps) {
    k = next_task<false>(tasks, count, k, b);
    const AdamWTask& t = tasks[k];
    const AdamWArgs& a = t.a;
    const int64_t lb = b - t.first_block;  // the state block within its tensor
    P* p = static_cast<P*>(a.param);
    const G* g = static_cast<const G*>(a.grad);
    const float b1 = a.beta1, omb1 = 1.0 - a.beta1, b2 = a.beta2, omb2 = 1.0 - a.beta2, eps = a.eps;
    int64_t idx[kPerLane];
    bool sel[kPerLane];
    float gi[kPerLane], pi[kPerLane], m_old[kPerLane], v_old[kPerLane];
    bool any = false;
    float am_old = 0.f, av_old = 0.f;
    if constexpr (kEightBit) {
      am_old = a.absmax_m[lb];
      av_old = a.absmax_v[lb];
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {  // every load first, so they are in flight together
      const int64_t j = lb * kBlock + e * 32 + lane;
      const bool valid = j < a.length;
      sel[e] = valid && select(a, j, &idx[e]);
      any |= sel[e];
      gi[e] = sel[e] ? to_f32(g[idx[e]]) : 0.f;
      pi[e] = sel[e] ? to_f32(p[idx[e]]) : 0.f;
      if constexpr (kEightBit) {
        m_old[e] = valid ? __fmul_rn(qmap_m[static_cast<const uint8_t*>(a.exp_avg)[j]], am_old) : 0.f;
        v_old[e] = valid ? __fmul_rn(qmap_v[static_cast<const uint8_t*>(a.exp_avg_sq)[j]], av_old) : 0.f;
      } else {
        m_old[e] = sel[e] ? to_f32(static_cast<const S*>(a.exp_avg)[j]) : 0.f;
        v_old[e] = sel[e] ? to_f32(static_cast<const S*>(a.exp_avg_sq)[j]) : 0.f;
      }
    }
    // a block with no selected entry keeps its params, scale and codes
    if (!__any_sync(0xffffffffu, any)) continue;
    float m[kPerLane], v[kPerLane], max_m = 0.f, max_v = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {  // reference order, no FMA contraction (--fmad=false)
      m[e] = m_old[e] * b1 + omb1 * gi[e];
      v[e] = v_old[e] * b2 + omb2 * gi[e] * gi[e];
      if (sel[e]) {
        const float denom = __fdiv_rn(__fsqrt_rn(v[e]), t.bias2) + eps;
        p[idx[e]] = from_f32<P>(pi[e] * t.decay + t.step_size * __fdiv_rn(m[e], denom));
      }
      max_m = fmaxf(max_m, sel[e] ? fabsf(m[e]) : fabsf(m_old[e]));  // unselected: their current value
      max_v = fmaxf(max_v, sel[e] ? fabsf(v[e]) : fabsf(v_old[e]));
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      if constexpr (!kEightBit) {
        const int64_t j = lb * kBlock + e * 32 + lane;
        if (sel[e]) static_cast<S*>(a.exp_avg)[j] = from_f32<S>(m[e]);
        if (sel[e]) static_cast<S*>(a.exp_avg_sq)[j] = from_f32<S>(v[e]);
      }
    }
    if constexpr (kEightBit) {
      const float am = warp_max(max_m), av = warp_max(max_v);
      if (lane == 0) {
        a.absmax_m[lb] = am;
        a.absmax_v[lb] = av;
      }
      const float rm = __frcp_rn(fmaxf(am, 1e-38f)), rv = __frcp_rn(fmaxf(av, 1e-38f));
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        if (!sel[e]) continue;
        const int64_t j = lb * kBlock + e * 32 + lane;
        static_cast<uint8_t*>(a.exp_avg)[j] = quantize(table_m, fminf(fmaxf(m[e] * rm, -1.f), 1.f));
        static_cast<uint8_t*>(a.exp_avg_sq)[j] = quantize(table_v, fminf(fmaxf(v[e] * rv, -1.f), 1.f));
      }
    }
  }
}

int multiprocessors() {
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return std::max(sms, 1);
}

// A grid of as many blocks of `threads` as fit on the GPU at once (a grid-stride loop does the rest).
template <typename Kernel>
int64_t resident_grid(Kernel kernel, int threads) {
  int per_sm = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  return int64_t(std::max(per_sm, 1)) * multiprocessors();
}

template <typename P, typename G>
void launch_update(const AdamWGroup& grp, const AdamWTask* tasks, const float* found, const float* qmap_m,
                   const float* qmap_v, cudaStream_t s) {
  const int count = static_cast<int>(grp.end - grp.begin);
  const AdamWTask* t = tasks + grp.begin;
  auto run = [&](auto kernel) {
    const int64_t needed = (grp.blocks + kWarps - 1) / kWarps;
    const unsigned grid = static_cast<unsigned>(std::min(needed, resident_grid(kernel, kWarps * 32)));
    kernel<<<grid, kWarps * 32, 0, s>>>(t, count, grp.blocks, found, qmap_m, qmap_v);
    check_launch("masked_adamw update_kernel");
  };
  switch (grp.state_dtype) {
    case kF32: run(update_kernel<P, G, float, false>); break;
    case kBF16: run(update_kernel<P, G, __nv_bfloat16, false>); break;
    default: run(update_kernel<P, G, uint8_t, true>); break;
  }
}

}  // namespace
}  // namespace cuda

void masked_adamw_cuda(AdamWTask* tasks, int64_t count, const AdamWGroup* groups, int64_t num_groups,
                       int64_t check_chunks, bool selected_only, float* found_inf, const float* qmap_m,
                       const float* qmap_v, void* stream) {
  using namespace cuda;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (count == 0) return;
  const int n = static_cast<int>(count);
  if (check_chunks > 0) {
    const unsigned grid = static_cast<unsigned>(std::min(check_chunks, resident_grid(check_kernel, kCheckThreads)));
    check_kernel<<<grid, kCheckThreads, 0, s>>>(tasks, n, check_chunks, selected_only, found_inf);
    check_launch("masked_adamw check_kernel");
  }
  step_kernel<<<static_cast<unsigned>((count + 127) / 128), 128, 0, s>>>(tasks, n, found_inf);
  check_launch("masked_adamw step_kernel");
  for (int64_t k = 0; k < num_groups; ++k) {
    const AdamWGroup& grp = groups[k];
    if (grp.blocks == 0) continue;
    if (grp.param_dtype == kF32) {
      if (grp.grad_dtype == kF32) launch_update<float, float>(grp, tasks, found_inf, qmap_m, qmap_v, s);
      else launch_update<float, __nv_bfloat16>(grp, tasks, found_inf, qmap_m, qmap_v, s);
    } else {
      if (grp.grad_dtype == kF32) launch_update<__nv_bfloat16, float>(grp, tasks, found_inf, qmap_m, qmap_v, s);
      else launch_update<__nv_bfloat16, __nv_bfloat16>(grp, tasks, found_inf, qmap_m, qmap_v, s);
    }
  }
}

}  // namespace fasterase
