// CUDA paired noise loss: one 256-thread block per (sample, chunk), on a 1-D grid (2^31 - 1 blocks;
// gridDim.y would stop at 65535 samples), writes both gradients and a loss partial; one block sums the
// partials in fp64 in a fixed order (deterministic): each thread a strided share, then a fixed tree.
#include <cuda_runtime.h>

#include "common.cuh"

namespace fasterase {
namespace cuda {
namespace {

constexpr int64_t kChunk = 4096;

template <typename P, typename T, typename U>
__global__ void paired_kernel(PairedLossArgs a, int64_t chunks) {
  __shared__ float red[8];
  const int64_t b = blockIdx.x / chunks, chunk = blockIdx.x % chunks, n = a.per_sample;
  const int64_t e0 = chunk * kChunk, e1 = min(e0 + kChunk, n);
  const float scale = a.sign[b] * a.eta;
  const float two_over_n = static_cast<float>(2.0 / static_cast<double>(n));
  const float coef_c = two_over_n * a.weight[b], coef_u = two_over_n * a.uncond_weight[b];
  const P* pc = static_cast<const P*>(a.pred_cond) + b * n;
  const U* pu = a.pred_uncond ? static_cast<const U*>(a.pred_uncond) + b * n : nullptr;
  const T* tc = static_cast<const T*>(a.teacher_cond) + b * n;
  const T* tu = static_cast<const T*>(a.teacher_uncond) + b * n;
  P* gc = static_cast<P*>(a.grad_cond) + b * n;
  U* gu = pu ? static_cast<U*>(a.grad_uncond) + b * n : nullptr;
  float sum_c = 0.f, sum_u = 0.f;
#pragma unroll 4
  for (int64_t e = e0 + threadIdx.x; e < e1; e += blockDim.x) {
    const float u = to_f32(tu[e]);
    const float dc = to_f32(pc[e]) - (u + scale * (to_f32(tc[e]) - u));
    sum_c += dc * dc;
    gc[e] = from_f32<P>(coef_c * dc);
    if (pu) {
      const float du = to_f32(pu[e]) - u;
      sum_u += du * du;
      gu[e] = from_f32<U>(coef_u * du);
    }
  }
  sum_c = block_sum(sum_c, red);
  sum_u = block_sum(sum_u, red);
  if (threadIdx.x == 0) a.partials[blockIdx.x] = a.weight[b] * sum_c + (pu ? a.uncond_weight[b] * sum_u : 0.f);
}

constexpr int kFinishThreads = 256;

__global__ void finish_kernel(const float* partials, int64_t count, int64_t n, float* loss) {
  __shared__ double red[kFinishThreads];
  double total = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += kFinishThreads) total += partials[i];
  red[threadIdx.x] = total;
  __syncthreads();
  for (int w = kFinishThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) red[threadIdx.x] += red[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *loss = static_cast<float>(red[0] / static_cast<double>(n));
}

template <typename P, typename T, typename U>
void launch(const PairedLossArgs& a, float* loss, cudaStream_t s) {
  const int64_t chunks = paired_noise_loss_cuda_chunks(a.per_sample);
  // chunks * batch <= 2^31 - 1: binding.cpp checks
  paired_kernel<P, T, U><<<static_cast<unsigned>(chunks * a.batch), 256, 0, s>>>(a, chunks);
  check_launch("paired_kernel");
  finish_kernel<<<1, kFinishThreads, 0, s>>>(a.partials, chunks * a.batch, a.per_sample, loss);
  check_launch("finish_kernel");
}

template <typename P, typename T>
void launch_u(const PairedLossArgs& a, float* loss, cudaStream_t s) {
  switch (a.uncond_dtype) {
    case kF32: launch<P, T, float>(a, loss, s); break;
    case kBF16: launch<P, T, __nv_bfloat16>(a, loss, s); break;
    default: launch<P, T, __half>(a, loss, s); break;
  }
}

template <typename P>
void launch_t(const PairedLossArgs& a, float* loss, cudaStream_t s) {
  switch (a.teacher_dtype) {
    case kF32: launch_u<P, float>(a, loss, s); break;
    case kBF16: launch_u<P, __nv_bfloat16>(a, loss, s); break;
    default: launch_u<P, __half>(a, loss, s); break;
  }
}

}  // namespace
}  // namespace cuda

int64_t paired_noise_loss_cuda_chunks(int64_t per_sample) { return (per_sample + cuda::kChunk - 1) / cuda::kChunk; }

void paired_noise_loss_cuda(const PairedLossArgs& a, float* loss, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (a.batch == 0 || a.per_sample == 0) {
    const cudaError_t err = cudaMemsetAsync(loss, 0, sizeof(float), s);
    if (err != cudaSuccess)
      throw std::runtime_error(std::string("fasterase: zeroing the loss failed: ") + cudaGetErrorString(err));
    return;
  }
  switch (a.pred_dtype) {
    case kF32: cuda::launch_t<float>(a, loss, s); break;
    case kBF16: cuda::launch_t<__nv_bfloat16>(a, loss, s); break;
    default: cuda::launch_t<__half>(a, loss, s); break;
  }
}

}  // namespace fasterase
