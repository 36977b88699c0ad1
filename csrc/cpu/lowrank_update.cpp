// CPU batched low-rank update W += (W @ left^T) @ right: OpenMP over (weight, row); each row is
// read once into fp32, gets its k dot products, and is written once. Semantics: fasterase/ops/rank_update.py.
#include <vector>

#include "../kernels.h"
#include "common.h"

namespace fasterase {
namespace cpu {
namespace {

template <typename T>
void lowrank(const LowRankArgs& a) {
  const int64_t total = a.num_weights * a.rows, cols = a.cols, k = a.k;
#pragma omp parallel
  {
    std::vector<float> row(cols), dots(k);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < total; ++r) {
      const int64_t w = r / a.rows;
      T* dst = static_cast<T*>(a.weights[w]) + (r % a.rows) * cols;
      const float* left = a.left + (a.per_weight ? w * k * cols : 0);
      const float* right = a.right + (a.per_weight ? w * k * cols : 0);
      for (int64_t c = 0; c < cols; ++c) row[c] = load(dst, c);
      for (int64_t j = 0; j < k; ++j) {
        float acc = 0.f;
        const float* l = left + j * cols;
        for (int64_t c = 0; c < cols; ++c) acc += row[c] * l[c];
        dots[j] = acc;
      }
      for (int64_t c = 0; c < cols; ++c) {
        float upd = 0.f;
        for (int64_t j = 0; j < k; ++j) upd += dots[j] * right[j * cols + c];
        store(dst, c, row[c] + upd);
      }
    }
  }
}

}  // namespace
}  // namespace cpu

void lowrank_update_cpu(const LowRankArgs& a) {
  FASTERASE_DISPATCH_FLOAT(a.dtype, T, cpu::lowrank<T>(a));
}

}  // namespace fasterase
