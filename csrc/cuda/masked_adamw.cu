// CUDA masked AdamW: a check kernel over the selected gradients, then one 256-thread block per
// 256-entry state block (the 8-bit absmax block). Semantics: fasterase/ops/adamw.py.
#include <cuda_runtime.h>

#include "common.cuh"

namespace fasterase {
namespace cuda {
namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ bool select(const AdamWArgs& a, int64_t j, int64_t* i) {
  *i = a.mask_idx ? static_cast<int64_t>(a.mask_idx[j]) : j;
  return a.mask_bits == nullptr || ((a.mask_bits[*i >> 3] >> (*i & 7)) & 1);
}

template <typename G>
__global__ void check_kernel(AdamWArgs a) {
  const G* g = static_cast<const G*>(a.grad);
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < a.length; j += int64_t(gridDim.x) * blockDim.x) {
    int64_t i;
    if (select(a, j, &i) && !isfinite(to_f32(g[i]))) *a.found_inf = 1.f;
  }
}

__global__ void advance_step_kernel(AdamWArgs a) {
  if (*a.found_inf == 0.f) *a.step += 1.f;
}

template <typename P, typename G, typename S, bool kEightBit>
__global__ void update_kernel(AdamWArgs a) {
  __shared__ float consts[3];
  __shared__ float red[8];
  if (*a.found_inf != 0.f) return;  // uniform across the grid
  if (threadIdx.x == 0) {  // bias corrections in fp64, as the reference computes them
    const double t = *a.step;
    consts[0] = static_cast<float>(1.0 - a.lr * a.weight_decay);
    consts[1] = static_cast<float>(-a.lr / (1.0 - pow(a.beta1, t)));
    consts[2] = static_cast<float>(sqrt(1.0 - pow(a.beta2, t)));
  }
  __syncthreads();
  const float b1 = a.beta1, omb1 = 1.0 - a.beta1, b2 = a.beta2, omb2 = 1.0 - a.beta2, eps = a.eps;
  const int64_t b = blockIdx.x, j = b * kBlock + threadIdx.x;
  const bool valid = j < a.length;
  int64_t i = 0;
  const bool sel = valid && select(a, j, &i);
  P* p = static_cast<P*>(a.param);
  const G* g = static_cast<const G*>(a.grad);
  float m_old = 0.f, v_old = 0.f;
  if constexpr (kEightBit) {
    const uint8_t* mq = static_cast<const uint8_t*>(a.exp_avg);
    const uint8_t* vq = static_cast<const uint8_t*>(a.exp_avg_sq);
    if (valid) {
      m_old = __fmul_rn(a.qmap_m[mq[j]], a.absmax_m[b]);
      v_old = __fmul_rn(a.qmap_v[vq[j]], a.absmax_v[b]);
    }
  } else {
    if (sel) m_old = to_f32(static_cast<const S*>(a.exp_avg)[j]);
    if (sel) v_old = to_f32(static_cast<const S*>(a.exp_avg_sq)[j]);
  }
  float m = 0.f, v = 0.f;
  if (sel) {  // reference order, no FMA contraction (--fmad=false)
    const float gi = to_f32(g[i]);
    m = m_old * b1 + omb1 * gi;
    v = v_old * b2 + omb2 * gi * gi;
    const float denom = __fdiv_rn(__fsqrt_rn(v), consts[2]) + eps;
    p[i] = from_f32<P>(to_f32(p[i]) * consts[0] + consts[1] * __fdiv_rn(m, denom));
  }
  if constexpr (kEightBit) {
    const int touched = __syncthreads_or(sel);
    if (!touched) return;
    const float am = block_max(sel ? fabsf(m) : (valid ? fabsf(m_old) : 0.f), red);
    const float av = block_max(sel ? fabsf(v) : (valid ? fabsf(v_old) : 0.f), red);
    if (threadIdx.x == 0) {
      a.absmax_m[b] = am;
      a.absmax_v[b] = av;
    }
    if (sel) {
      const float rm = __frcp_rn(fmaxf(am, 1e-38f)), rv = __frcp_rn(fmaxf(av, 1e-38f));
      static_cast<uint8_t*>(a.exp_avg)[j] = quantize_code(a.qmap_m, fminf(fmaxf(m * rm, -1.f), 1.f));
      static_cast<uint8_t*>(a.exp_avg_sq)[j] = quantize_code(a.qmap_v, fminf(fmaxf(v * rv, -1.f), 1.f));
    }
  } else {
    if (sel) {
      static_cast<S*>(a.exp_avg)[j] = from_f32<S>(m);
      static_cast<S*>(a.exp_avg_sq)[j] = from_f32<S>(v);
    }
  }
}

template <typename P, typename G>
void launch_update(const AdamWArgs& a, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>((a.length + kBlock - 1) / kBlock);
  switch (a.state_dtype) {
    case kF32: update_kernel<P, G, float, false><<<blocks, kBlock, 0, s>>>(a); break;
    case kBF16: update_kernel<P, G, __nv_bfloat16, false><<<blocks, kBlock, 0, s>>>(a); break;
    default: update_kernel<P, G, uint8_t, true><<<blocks, kBlock, 0, s>>>(a); break;
  }
}

}  // namespace
}  // namespace cuda

void masked_adamw_cuda(const AdamWArgs& a, void* stream) {
  using namespace cuda;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.length > 0) {
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>((a.length + 255) / 256, 4096));
    if (a.grad_dtype == kF32) check_kernel<float><<<grid, 256, 0, s>>>(a);
    else check_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(a);
  }
  advance_step_kernel<<<1, 1, 0, s>>>(a);
  if (a.length == 0) return;
  if (a.param_dtype == kF32) {
    if (a.grad_dtype == kF32) launch_update<float, float>(a, s); else launch_update<float, __nv_bfloat16>(a, s);
  } else {
    if (a.grad_dtype == kF32) launch_update<__nv_bfloat16, float>(a, s);
    else launch_update<__nv_bfloat16, __nv_bfloat16>(a, s);
  }
}

}  // namespace fasterase
