// CPU masked AdamW: one pass checks the selected gradients, one pass over 256-entry state blocks
// updates params and states (OpenMP over blocks). Semantics: fasterase/ops/adamw.py.
#include <algorithm>
#include <cmath>

#include "../kernels.h"
#include "common.h"

namespace fasterase {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256;

struct Consts {
  float b1, omb1, b2, omb2, decay, step_size, c2, eps;
};

// State entry j -> param index i; whether it is selected.
inline bool select(const AdamWArgs& a, int64_t j, int64_t* i) {
  *i = a.mask_idx ? static_cast<int64_t>(a.mask_idx[j]) : j;
  return a.mask_bits == nullptr || ((a.mask_bits[*i >> 3] >> (*i & 7)) & 1);
}

template <typename G>
bool selected_grads_finite(const AdamWArgs& a) {
  const G* g = static_cast<const G*>(a.grad);
  int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
  for (int64_t j = 0; j < a.length; ++j) {
    int64_t i;
    if (select(a, j, &i)) bad |= !std::isfinite(load(g, i));
  }
  return bad == 0;
}

// The AdamW element update, in the reference's operation order; returns the new m and v.
template <typename P, typename G>
inline void step_element(const Consts& c, P* p, const G* g, int64_t i, float m_old, float v_old,
                         float* m_new, float* v_new) {
  const float gi = load(g, i);
  const float m = m_old * c.b1 + c.omb1 * gi;
  const float v = v_old * c.b2 + c.omb2 * gi * gi;
  const float denom = std::sqrt(v) / c.c2 + c.eps;
  store(p, i, load(p, i) * c.decay + c.step_size * (m / denom));
  *m_new = m;
  *v_new = v;
}

template <typename P, typename G, typename S>
void update_plain(const AdamWArgs& a, const Consts& c) {
  P* p = static_cast<P*>(a.param);
  const G* g = static_cast<const G*>(a.grad);
  S* ms = static_cast<S*>(a.exp_avg);
  S* vs = static_cast<S*>(a.exp_avg_sq);
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < a.length; ++j) {
    int64_t i;
    if (!select(a, j, &i)) continue;
    float m, v;
    step_element(c, p, g, i, load(ms, j), load(vs, j), &m, &v);
    store(ms, j, m);
    store(vs, j, v);
  }
}

template <typename P, typename G>
void update_8bit(const AdamWArgs& a, const Consts& c) {
  P* p = static_cast<P*>(a.param);
  const G* g = static_cast<const G*>(a.grad);
  uint8_t* mq = static_cast<uint8_t*>(a.exp_avg);
  uint8_t* vq = static_cast<uint8_t*>(a.exp_avg_sq);
  const int64_t blocks = (a.length + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t j0 = b * kBlock, j1 = std::min(j0 + kBlock, a.length);
    float m_new[kBlock], v_new[kBlock];
    bool sel[kBlock];
    bool any = false;
    const float am_old = a.absmax_m[b], av_old = a.absmax_v[b];
    float am = 0.f, av = 0.f;
    for (int64_t j = j0; j < j1; ++j) {
      int64_t i;
      const float m_old = a.qmap_m[mq[j]] * am_old;
      const float v_old = a.qmap_v[vq[j]] * av_old;
      sel[j - j0] = select(a, j, &i);
      if (sel[j - j0]) {
        any = true;
        step_element(c, p, g, i, m_old, v_old, &m_new[j - j0], &v_new[j - j0]);
        am = std::max(am, std::fabs(m_new[j - j0]));
        av = std::max(av, std::fabs(v_new[j - j0]));
      } else {  // unselected entries keep their codes; the block scale must still cover them
        am = std::max(am, std::fabs(m_old));
        av = std::max(av, std::fabs(v_old));
      }
    }
    if (!any) continue;
    a.absmax_m[b] = am;
    a.absmax_v[b] = av;
    const float rm = 1.0f / std::max(am, 1e-38f), rv = 1.0f / std::max(av, 1e-38f);
    for (int64_t j = j0; j < j1; ++j) {
      if (!sel[j - j0]) continue;
      mq[j] = static_cast<uint8_t>(quantize_code(a.qmap_m, std::clamp(m_new[j - j0] * rm, -1.0f, 1.0f)));
      vq[j] = static_cast<uint8_t>(quantize_code(a.qmap_v, std::clamp(v_new[j - j0] * rv, -1.0f, 1.0f)));
    }
  }
}

template <typename P, typename G>
void update(const AdamWArgs& a, const Consts& c) {
  switch (a.state_dtype) {
    case kF32: update_plain<P, G, float>(a, c); break;
    case kBF16: update_plain<P, G, uint16_t>(a, c); break;
    default: update_8bit<P, G>(a, c); break;
  }
}

}  // namespace
}  // namespace cpu

void masked_adamw_cpu(const AdamWArgs& a) {
  using namespace cpu;
  if (*a.found_inf != 0.f) return;
  const bool finite = a.grad_dtype == kF32 ? selected_grads_finite<float>(a) : selected_grads_finite<uint16_t>(a);
  if (!finite) {
    *a.found_inf = 1.f;
    return;
  }
  *a.step += 1.f;
  const double t = *a.step;
  const double c1 = 1.0 - std::pow(a.beta1, t);
  const Consts c{static_cast<float>(a.beta1), static_cast<float>(1.0 - a.beta1),
                 static_cast<float>(a.beta2), static_cast<float>(1.0 - a.beta2),
                 static_cast<float>(1.0 - a.lr * a.weight_decay), static_cast<float>(-a.lr / c1),
                 static_cast<float>(std::sqrt(1.0 - std::pow(a.beta2, t))), static_cast<float>(a.eps)};
  if (a.param_dtype == kF32) {
    if (a.grad_dtype == kF32) update<float, float>(a, c); else update<float, uint16_t>(a, c);
  } else {
    if (a.grad_dtype == kF32) update<uint16_t, float>(a, c); else update<uint16_t, uint16_t>(a, c);
  }
}

}  // namespace fasterase
