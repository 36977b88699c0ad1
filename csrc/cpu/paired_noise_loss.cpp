// CPU paired noise loss: one pass over (sample, chunk) computes the fp32 gradients of both
// predictions and per-chunk loss partials (double), summed in a fixed order so the result does
// not depend on the thread count. Semantics: fasterase/ops/noise_loss.py.
#include <algorithm>
#include <vector>

#include "../kernels.h"
#include "common.h"

namespace fasterase {
namespace cpu {
namespace {

constexpr int64_t kChunk = 16384;

template <typename P, typename T, typename U>
float paired(const PairedLossArgs& a) {
  const int64_t n = a.per_sample, chunks = (n + kChunk - 1) / kChunk, total = a.batch * chunks;
  const P* pc = static_cast<const P*>(a.pred_cond);
  const U* pu = static_cast<const U*>(a.pred_uncond);
  const T* tc = static_cast<const T*>(a.teacher_cond);
  const T* tu = static_cast<const T*>(a.teacher_uncond);
  P* gc = static_cast<P*>(a.grad_cond);
  U* gu = static_cast<U*>(a.grad_uncond);
  const float two_over_n = static_cast<float>(2.0 / static_cast<double>(std::max<int64_t>(n, 1)));
  std::vector<double> partial(total, 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t b = t / chunks, e0 = b * n + (t % chunks) * kChunk, e1 = std::min(e0 + kChunk, (b + 1) * n);
    const float scale = a.sign[b] * a.eta;
    const float coef_c = two_over_n * a.weight[b], coef_u = two_over_n * a.uncond_weight[b];
    double sum_c = 0.0, sum_u = 0.0;
    for (int64_t e = e0; e < e1; ++e) {
      const float u = load(tu, e);
      const float dc = load(pc, e) - (u + scale * (load(tc, e) - u));
      sum_c += static_cast<double>(dc) * dc;
      store(gc, e, coef_c * dc);
      if (pu) {
        const float du = load(pu, e) - u;
        sum_u += static_cast<double>(du) * du;
        store(gu, e, coef_u * du);
      }
    }
    partial[t] = a.weight[b] * sum_c + (pu ? a.uncond_weight[b] * sum_u : 0.0);
  }
  double loss = 0.0;
  for (double v : partial) loss += v;
  return static_cast<float>(loss / static_cast<double>(std::max<int64_t>(n, 1)));
}

template <typename P, typename T>
float paired_u(const PairedLossArgs& a) {
  float out = 0.f;
  FASTERASE_DISPATCH_FLOAT(a.uncond_dtype, U, out = (paired<P, T, U>(a)));
  return out;
}

template <typename P>
float paired_t(const PairedLossArgs& a) {
  float out = 0.f;
  FASTERASE_DISPATCH_FLOAT(a.teacher_dtype, T, out = (paired_u<P, T>(a)));
  return out;
}

}  // namespace
}  // namespace cpu

float paired_noise_loss_cpu(const PairedLossArgs& a) {
  float out = 0.f;
  FASTERASE_DISPATCH_FLOAT(a.pred_dtype, P, out = cpu::paired_t<P>(a));
  return out;
}

}  // namespace fasterase
