// CUDA batched low-rank update W += (W @ left^T) @ right: one 256-thread block per (row, weight), on
// a 1-D grid (2^31 - 1 blocks; gridDim.y would stop at 65535 weights); the row's k dot products are
// block reductions, then the row is rewritten once.
#include <cuda_runtime.h>

#include "common.cuh"

namespace fasterase {
namespace cuda {
namespace {

template <typename T>
__global__ void lowrank_kernel(LowRankArgs a) {
  __shared__ float dots[kMaxRank];  // binding.cpp checks k <= kMaxRank
  __shared__ float red[8];
  const int64_t w = blockIdx.x / a.rows, r = blockIdx.x % a.rows, cols = a.cols;
  T* row = static_cast<T*>(a.weights[w]) + r * cols;
  const float* left = a.left + (a.per_weight ? w * a.k * cols : 0);
  const float* right = a.right + (a.per_weight ? w * a.k * cols : 0);
  for (int64_t j = 0; j < a.k; ++j) {
    float acc = 0.f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) acc += to_f32(row[c]) * left[j * cols + c];
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) dots[j] = acc;
  }
  __syncthreads();
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    float upd = 0.f;
    for (int64_t j = 0; j < a.k; ++j) upd += dots[j] * right[j * cols + c];
    row[c] = from_f32<T>(to_f32(row[c]) + upd);
  }
}

}  // namespace
}  // namespace cuda

void lowrank_update_cuda(const LowRankArgs& a, void* stream) {
  using namespace cuda;
  if (a.rows == 0 || a.cols == 0 || a.num_weights == 0) return;
  const unsigned grid = static_cast<unsigned>(a.rows * a.num_weights);  // <= 2^31 - 1: binding.cpp checks
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: lowrank_kernel<float><<<grid, 256, 0, s>>>(a); break;
    case kBF16: lowrank_kernel<__nv_bfloat16><<<grid, 256, 0, s>>>(a); break;
    default: lowrank_kernel<__half><<<grid, 256, 0, s>>>(a); break;
  }
  check_launch("lowrank_kernel");
}

}  // namespace fasterase
