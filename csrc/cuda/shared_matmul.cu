// CUDA shared transform W <- W @ T (+ A) for many same-shape weights in one launch: 32x32 shared-
// memory tiles into an fp32 scratch (every output tile reads whole rows of the old W), then one
// launch writes the results back in W's dtype.
#include <cuda_runtime.h>

#include "common.cuh"

namespace fasterase {
namespace cuda {
namespace {

constexpr int kTile = 32;

template <typename T>
__global__ void matmul_kernel(SharedMatmulArgs a) {
  __shared__ float ws[kTile][kTile + 1];
  __shared__ float ts[kTile][kTile + 1];
  const int64_t w = blockIdx.z, rows = a.rows, cols = a.cols;
  const int64_t r = blockIdx.y * kTile + threadIdx.y, c = blockIdx.x * kTile + threadIdx.x;
  const T* src = static_cast<const T*>(a.weights[w]);
  float acc = 0.f;
  for (int64_t k0 = 0; k0 < cols; k0 += kTile) {
    const int64_t kw = k0 + threadIdx.x, kt = k0 + threadIdx.y;
    ws[threadIdx.y][threadIdx.x] = (r < rows && kw < cols) ? to_f32(src[r * cols + kw]) : 0.f;
    ts[threadIdx.y][threadIdx.x] = (kt < cols && c < cols) ? a.transform[kt * cols + c] : 0.f;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) acc += ws[threadIdx.y][k] * ts[k][threadIdx.x];
    __syncthreads();
  }
  if (r < rows && c < cols) {
    if (a.addends) acc += a.addends[w][r * cols + c];
    a.scratch[(w * rows + r) * cols + c] = acc;
  }
}

template <typename T>
__global__ void write_back_kernel(SharedMatmulArgs a) {
  const int64_t w = blockIdx.y, size = a.rows * a.cols;
  T* dst = static_cast<T*>(a.weights[w]);
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < size; e += int64_t(gridDim.x) * blockDim.x)
    dst[e] = from_f32<T>(a.scratch[w * size + e]);
}

template <typename T>
void launch(const SharedMatmulArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((a.cols + kTile - 1) / kTile), static_cast<unsigned>((a.rows + kTile - 1) / kTile),
                  static_cast<unsigned>(a.num_weights));
  matmul_kernel<T><<<grid, dim3(kTile, kTile), 0, s>>>(a);
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((a.rows * a.cols + 255) / 256, 1024));
  write_back_kernel<T><<<dim3(blocks, static_cast<unsigned>(a.num_weights)), 256, 0, s>>>(a);
}

}  // namespace
}  // namespace cuda

void shared_matmul_cuda(const SharedMatmulArgs& a, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (a.dtype) {
    case kF32: cuda::launch<float>(a, s); break;
    case kBF16: cuda::launch<__nv_bfloat16>(a, s); break;
    default: cuda::launch<__half>(a, s); break;
  }
}

}  // namespace fasterase
