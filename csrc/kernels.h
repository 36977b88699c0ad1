// Torch-free kernel entry points of fasterase._C. csrc/cpu/*.cpp and csrc/cuda/*.cu implement them on
// raw pointers so they compile fast and stand alone (nvcc -c works without torch); binding.cpp
// validates torch tensors and fills these structs. Semantics: fasterase/ops/*.py references.
#pragma once
#include <cstdint>

namespace fasterase {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2, kU8 = 3 };

struct AdamWArgs {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  float* step;             // one element, advanced when the step is taken
  float* found_inf;        // one element, in/out skip flag
  const uint8_t* mask_bits;  // nullable, LSB-first bitmask over params
  const int32_t* mask_idx;   // nullable, sorted indices; states are then compact
  float* absmax_m;         // 8-bit only
  float* absmax_v;
  const float* qmap_m;     // 256 sorted codes, 8-bit only
  const float* qmap_v;
  int64_t n;               // params
  int64_t length;          // state entries (n, or number of indices)
  int param_dtype, grad_dtype, state_dtype;
  double lr, beta1, beta2, eps, weight_decay;  // scalars as Python passes them
};

struct LowRankArgs {
  void* const* weights;    // num_weights pointers to (rows x cols) matrices of dtype
  const float* left;       // (k x cols), or (num_weights x k x cols) when per_weight
  const float* right;
  int64_t num_weights, rows, cols, k;
  int dtype;
  bool per_weight;
};

struct SharedMatmulArgs {
  void* const* weights;         // num_weights (rows x cols) matrices of dtype, overwritten with W @ T (+ A)
  const float* const* addends;  // nullable; else num_weights fp32 (rows x cols)
  const float* transform;       // (cols x cols)
  float* scratch;               // num_weights x rows x cols fp32 workspace (CUDA only)
  int64_t num_weights, rows, cols;
  int dtype;
};

struct PairedLossArgs {
  const void* pred_cond;
  const void* pred_uncond;  // nullable
  const void* teacher_cond;
  const void* teacher_uncond;
  const float* sign;
  const float* weight;
  const float* uncond_weight;
  void* grad_cond;
  void* grad_uncond;        // nullable when pred_uncond is
  float* partials;          // CUDA: workspace of batch * chunks floats
  int64_t batch, per_sample;
  int pred_dtype, teacher_dtype, uncond_dtype;
  float eta;
};

void masked_adamw_cpu(const AdamWArgs& a);
// count tensors' steps with one skip decision: if *found_inf is set, or any entry of any gradient
// (masked or not) is non-finite, only *found_inf (set to 1) is written; each AdamWArgs::found_inf is unused.
void masked_adamw_multi_cpu(const AdamWArgs* args, int64_t count, float* found_inf);
void lowrank_update_cpu(const LowRankArgs& a);
float paired_noise_loss_cpu(const PairedLossArgs& a);

// CUDA launchers (stream is a cudaStream_t); the loss is written to *loss_out on the device.
void masked_adamw_cuda(const AdamWArgs& a, void* stream);
void lowrank_update_cuda(const LowRankArgs& a, void* stream);
void shared_matmul_cuda(const SharedMatmulArgs& a, void* stream);
int64_t paired_noise_loss_cuda_chunks(int64_t per_sample);
void paired_noise_loss_cuda(const PairedLossArgs& a, float* loss_out, void* stream);

}  // namespace fasterase
