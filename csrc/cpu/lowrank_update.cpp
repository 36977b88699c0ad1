// CPU batched low-rank update W += (W @ left^T) @ right: OpenMP over (weight, row); each row is
// read once, gets its k dot products, and is written once. Semantics: fasterase/ops/rank_update.py.
//
// Speed notes: a dot product summed into one float is a serial chain of dependent adds (gcc may not
// reorder float adds), so the dots keep kLanes independent partial sums that gcc vectorises; the
// update is summed per column in the same order as before (0 + d0*r0 + d1*r1 ..., then row + upd),
// as straight loops over the columns. fp32 rows are read in place, without a copy.
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "common.h"

namespace fasterase {
namespace cpu {
namespace {

constexpr int64_t kLanes = 16;

// sum_c row[c] * l[c], with kLanes partial sums (lane c % kLanes), then the lanes in order.
inline float dot(const float* __restrict row, const float* __restrict l, int64_t cols) {
  float acc[kLanes] = {};
  const int64_t main = cols - cols % kLanes;
  for (int64_t c = 0; c < main; c += kLanes)
    for (int64_t s = 0; s < kLanes; ++s) acc[s] += row[c + s] * l[c + s];
  for (int64_t c = main; c < cols; ++c) acc[c - main] += row[c] * l[c];
  float total = 0.f;
  for (int64_t s = 0; s < kLanes; ++s) total += acc[s];
  return total;
}

template <typename T>
void lowrank(const LowRankArgs& a) {
  const int64_t total = a.num_weights * a.rows, cols = a.cols, k = a.k;
#pragma omp parallel
  {
    std::vector<float> row_buf(std::is_same_v<T, float> ? 0 : cols), upd_buf(cols), dots(k);
    float* __restrict upd = upd_buf.data();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < total; ++r) {
      const int64_t w = r / a.rows;
      T* dst = static_cast<T*>(a.weights[w]) + (r % a.rows) * cols;
      const float* left = a.left + (a.per_weight ? w * k * cols : 0);
      const float* right = a.right + (a.per_weight ? w * k * cols : 0);
      const float* row;
      if constexpr (std::is_same_v<T, float>) {
        row = dst;
      } else {
        for (int64_t c = 0; c < cols; ++c) row_buf[c] = load(dst, c);
        row = row_buf.data();
      }
      for (int64_t j = 0; j < k; ++j) dots[j] = dot(row, left + j * cols, cols);
      for (int64_t c = 0; c < cols; ++c) upd[c] = 0.f;
      for (int64_t j = 0; j < k; ++j) {
        const float d = dots[j];
        const float* __restrict rj = right + j * cols;
        for (int64_t c = 0; c < cols; ++c) upd[c] += d * rj[c];
      }
      // row may alias dst (fp32): each column is read before it is written
      for (int64_t c = 0; c < cols; ++c) store(dst, c, row[c] + upd[c]);
    }
  }
}

}  // namespace
}  // namespace cpu

void lowrank_update_cpu(const LowRankArgs& a) {
  FASTERASE_DISPATCH_FLOAT(a.dtype, T, cpu::lowrank<T>(a));
}

}  // namespace fasterase
