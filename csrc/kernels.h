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

// One tensor of a CUDA masked AdamW launch, copied to the device (csrc/cuda/masked_adamw.cu).
struct AdamWTask {
  AdamWArgs a;
  int64_t first_block;            // its first 256-entry state block within its dtype group's launch
  int64_t first_chunk;            // its first gradient-check chunk (kAdamWCheckChunk entries)
  float decay, step_size, bias2;  // 1 - lr wd, -lr / (1 - beta1^t), sqrt(1 - beta2^t): set on the device
};

// Tasks [begin, end) share param/grad/state dtypes and run in one update launch of `blocks` blocks.
struct AdamWGroup {
  int64_t begin, end, blocks;
  int param_dtype, grad_dtype, state_dtype;
};

constexpr int64_t kAdamWCheckChunk = 4096;

// Most rows k of left/right per low-rank call: the CUDA kernel keeps a row's k dots in shared memory
// (fasterase/ops/rank_update.py MAX_RANK).
constexpr int64_t kMaxRank = 64;

struct LowRankArgs {
  void* const* weights;    // num_weights pointers to (rows x cols) matrices of dtype
  const float* left;       // (k x cols), or (num_weights x k x cols) when per_weight
  const float* right;
  int64_t num_weights, rows, cols, k;
  int dtype;
  bool per_weight;
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
// All tasks' steps with one skip flag: a check launch over every task's gradients (the selected
// entries when selected_only, as masked_adamw checks; all entries otherwise, as masked_adamw_multi
// does), a step launch, then one update launch per group. tasks live on the device; groups on the host.
void masked_adamw_cuda(AdamWTask* tasks, int64_t count, const AdamWGroup* groups, int64_t num_groups,
                       int64_t check_chunks, bool selected_only, float* found_inf, const float* qmap_m,
                       const float* qmap_v, void* stream);
// The CUDA launchers throw std::runtime_error, naming the kernel, when a launch fails.
void lowrank_update_cuda(const LowRankArgs& a, void* stream);
int64_t paired_noise_loss_cuda_chunks(int64_t per_sample);
void paired_noise_loss_cuda(const PairedLossArgs& a, float* loss_out, void* stream);

}  // namespace fasterase
