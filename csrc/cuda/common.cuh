// Device helpers shared by the CUDA kernels: storage <-> fp32 and a block-wide sum.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../kernels.h"

namespace fasterase {
namespace cuda {

// What C10_CUDA_KERNEL_LAUNCH_CHECK() does, without torch (these files compile standalone, kernels.h):
// a launch that failed (bad configuration, no kernel image for this GPU) is reported at once, naming
// the kernel, instead of leaving the outputs unwritten. binding.cpp runs torch's own check after each launcher.
inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("fasterase: CUDA launch of ") + kernel + " failed: " +
                             cudaGetErrorString(err));
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half_rn(x); }

__device__ __forceinline__ float block_sum(float v, float* shared) {  // blockDim.x == 256
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  v = threadIdx.x < 8 ? shared[threadIdx.x] : 0.f;
  if (threadIdx.x < 32)
    for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  v = shared[0];
  __syncthreads();
  return v;
}

}  // namespace cuda
}  // namespace fasterase
