// CPU masked AdamW: a cheap vectorised non-finite check over the gradients, then one fused pass
// (OpenMP over 256-entry blocks) that updates params and states. Semantics: fasterase/ops/adamw.py.
// masked_adamw_multi_cpu does the same for a list of tensors in two parallel regions in all (one
// check over every gradient, one update over chunks of every tensor), instead of two per tensor.
//
// Why it is shaped like this:
// * The skip rule needs "any selected gradient non-finite" before anything is written, so the check
//   runs first. For dense and bitmask masks it scans every gradient's exponent bits (a branch-free
//   reduction gcc vectorises); only if that finds a non-finite value is the exact masked check run.
// * The mask kind is a template parameter, so the dense loop has no per-element selection branch and
//   vectorises; the all-fp32 arithmetic uses SSE intrinsics (see step_run_f32).
// * 8-bit codes: a per-code-map table on the top 16 bits of the scaled float gives a lower bound of
//   the code; a short linear step finishes it, giving exactly the binary search's answer.
#include <algorithm>
#include <cmath>
#include <mutex>
#include <type_traits>
#include <vector>

#include "../kernels.h"
#include "common.h"
#ifdef __SSE2__
#include <immintrin.h>
#endif

namespace fasterase {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256;

struct Consts {
  float b1, omb1, b2, omb2, decay, step_size, c2, eps;
};

enum MaskKind { kDense = 0, kBits = 1, kIdx = 2 };

// State entry j -> param index i; whether it is selected.
template <int K>
inline bool select(const AdamWArgs& a, int64_t j, int64_t* i) {
  if constexpr (K == kIdx) {
    *i = static_cast<int64_t>(a.mask_idx[j]);
    return true;
  } else {
    *i = j;
    if constexpr (K == kBits) return (a.mask_bits[j >> 3] >> (j & 7)) & 1;
    return true;
  }
}


// Non-zero if any of g[0..n) has an all-ones exponent (inf or NaN). Branch-free so it vectorises.
inline bool any_nonfinite_raw(const float* __restrict g, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(g);
  int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
  return bad != 0;
}
inline bool any_nonfinite_raw(const uint16_t* __restrict g, int64_t n) {
  int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad |= (g[i] & 0x7f80u) == 0x7f80u;
  return bad != 0;
}

// Serial forms of the scans above, for chunks of a multi-tensor check that is parallel over chunks.
inline int nonfinite_raw_serial(const float* __restrict g, int64_t n) {
  const uint32_t* u = reinterpret_cast<const uint32_t*>(g);
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (u[i] & 0x7f800000u) == 0x7f800000u;
  return bad;
}
inline int nonfinite_raw_serial(const uint16_t* __restrict g, int64_t n) {
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= (g[i] & 0x7f80u) == 0x7f80u;
  return bad;
}

template <typename G, int K>
bool selected_grads_finite_exact(const AdamWArgs& a) {
  const G* g = static_cast<const G*>(a.grad);
  int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static)
  for (int64_t j = 0; j < a.length; ++j) {
    int64_t i;
    if (select<K>(a, j, &i)) bad |= !std::isfinite(load(g, i));
  }
  return bad == 0;
}

template <typename G>
bool selected_grads_finite(const AdamWArgs& a) {
  if (a.mask_idx) return selected_grads_finite_exact<G, kIdx>(a);  // reads only the selected ones
  if (!any_nonfinite_raw(static_cast<const G*>(a.grad), a.n)) return true;
  // Some gradient is non-finite; with a bitmask it may be an unselected one.
  return a.mask_bits ? selected_grads_finite_exact<G, kBits>(a) : false;
}

// The AdamW element update, in the reference's operation order; returns the new m and v.
template <typename P, typename G>
__attribute__((always_inline)) inline void step_element(const Consts& c, P* __restrict p, const G* __restrict g,
                                                        int64_t i, float m_old, float v_old, float* m_new,
                                                        float* v_new) {
  const float gi = load(g, i);
  const float m = m_old * c.b1 + c.omb1 * gi;
  const float v = v_old * c.b2 + c.omb2 * gi * gi;
  const float denom = std::sqrt(v) / c.c2 + c.eps;
  store(p, i, load(p, i) * c.decay + c.step_size * (m / denom));
  *m_new = m;
  *v_new = v;
}

// step_element over n contiguous fp32 entries: m/v read from mi/vi, written to mo/vo (may be the
// same arrays). With -fmath-errno gcc will not vectorise std::sqrt, so the body is written with SSE
// intrinsics, doing the same IEEE operations in the same order (no FMA), hence the same bits.
inline void step_run_f32(const Consts& c, float* p, const float* g, const float* mi, const float* vi, float* mo,
                         float* vo, int64_t n) {
  int64_t k = 0;
#ifdef __SSE2__
  const __m128 b1 = _mm_set1_ps(c.b1), omb1 = _mm_set1_ps(c.omb1), b2 = _mm_set1_ps(c.b2),
               omb2 = _mm_set1_ps(c.omb2), decay = _mm_set1_ps(c.decay), ss = _mm_set1_ps(c.step_size),
               c2 = _mm_set1_ps(c.c2), eps = _mm_set1_ps(c.eps);
  for (; k + 4 <= n; k += 4) {
    const __m128 gi = _mm_loadu_ps(g + k);
    const __m128 m = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(mi + k), b1), _mm_mul_ps(omb1, gi));
    const __m128 v = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(vi + k), b2), _mm_mul_ps(_mm_mul_ps(omb2, gi), gi));
    const __m128 denom = _mm_add_ps(_mm_div_ps(_mm_sqrt_ps(v), c2), eps);
    const __m128 pn = _mm_add_ps(_mm_mul_ps(_mm_loadu_ps(p + k), decay), _mm_mul_ps(ss, _mm_div_ps(m, denom)));
    _mm_storeu_ps(p + k, pn);
    _mm_storeu_ps(mo + k, m);
    _mm_storeu_ps(vo + k, v);
  }
#endif
  for (; k < n; ++k) {
    float m, v;
    step_element(c, p, g, k, mi[k], vi[k], &m, &v);
    mo[k] = m;
    vo[k] = v;
  }
}

// One tensor's update, prepared once per step: its arguments, constants, code tables (8-bit) and the
// instantiation that updates a range of its 256-entry state blocks. The update functions below are
// serial over [b0, b1); run_jobs spreads the blocks of every job over the OpenMP threads.
struct Job;
using BlockFn = void (*)(const Job&, int64_t b0, int64_t b1);
struct CodeTable;
struct Job {
  const AdamWArgs* a;
  Consts c;
  const CodeTable* tm;
  const CodeTable* tv;
  BlockFn run;
  int64_t blocks;
};

template <typename P, typename G, typename S, int K>
void update_plain(const Job& job, int64_t b0, int64_t b1) {
  const AdamWArgs& a = *job.a;
  const Consts& c = job.c;
  P* __restrict p = static_cast<P*>(a.param);
  const G* __restrict g = static_cast<const G*>(a.grad);
  S* __restrict ms = static_cast<S*>(a.exp_avg);
  S* __restrict vs = static_cast<S*>(a.exp_avg_sq);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = b * kBlock, j1 = std::min(j0 + kBlock, a.length);
    if constexpr (K == kDense && std::is_same_v<P, float> && std::is_same_v<G, float> && std::is_same_v<S, float>) {
      step_run_f32(c, p + j0, g + j0, ms + j0, vs + j0, ms + j0, vs + j0, j1 - j0);
    } else if constexpr (K == kDense) {  // no selection branch
      for (int64_t j = j0; j < j1; ++j) {
        float m, v;
        step_element(c, p, g, j, load(ms, j), load(vs, j), &m, &v);
        store(ms, j, m);
        store(vs, j, v);
      }
    } else {
      for (int64_t j = j0; j < j1; ++j) {
        int64_t i;
        if (!select<K>(a, j, &i)) continue;
        float m, v;
        step_element(c, p, g, i, load(ms, j), load(vs, j), &m, &v);
        store(ms, j, m);
        store(vs, j, v);
      }
    }
  }
}

// Lower-bound code per top-16-bit pattern of a float, for one code map (see quantize_fast).
struct CodeTable {
  float code[256];
  float mid[256];           // mid[q] = (code[q] + code[q+1]) * 0.5f, as quantize_code computes it; mid[255] = inf
  int steps;                // most codes any bucket spans: the refinement steps needed
  uint8_t lower[1 << 16];
};

// Tables are built once per distinct code map (the maps are fixed), and kept for the process.
const CodeTable* code_table(const float* code) {
  static std::mutex mu;
  static std::vector<CodeTable*> cache;
  std::lock_guard<std::mutex> lock(mu);
  for (const CodeTable* t : cache)
    if (std::memcmp(t->code, code, sizeof(t->code)) == 0) return t;
  auto* t = new CodeTable;
  std::memcpy(t->code, code, sizeof(t->code));
  for (int q = 0; q < 255; ++q) t->mid[q] = (code[q] + code[q + 1]) * 0.5f;
  t->mid[255] = INFINITY;  // sentinel: no x is above it, so a step at q == 255 stays put
  t->steps = 0;
  for (uint32_t k = 0; k < (1u << 16); ++k) {
    // the smallest and largest floats sharing these top bits (for negatives the low bits set = smaller)
    const bool neg = k & 0x8000u;
    const uint32_t ulo = (k << 16) | (neg ? 0xffffu : 0u), uhi = (k << 16) | (neg ? 0u : 0xffffu);
    float lo, hi;
    std::memcpy(&lo, &ulo, 4);
    std::memcpy(&hi, &uhi, 4);
    const int qlo = quantize_code(code, lo), qhi = quantize_code(code, hi);
    // exponent all ones: NaN (inf is clamped away before the lookup), whose code is 0
    t->lower[k] = (k & 0x7f80u) == 0x7f80u ? 0 : static_cast<uint8_t>(qlo);
    t->steps = std::max(t->steps, qhi - qlo);
  }
  cache.push_back(t);
  return t;
}

// Same result as quantize_code(code, x): the count of midpoints < x, which is monotone in x, so
// starting from the count at the smallest float of x's bucket and stepping up is exact. Every bucket
// spans at most t->steps codes, so that many branch-free steps suffice (extra steps are no-ops).
// S > 0: a compile-time step count (the maps in use need 1); S == 0: `steps` at run time.
template <int S>
inline int quantize_fast(const CodeTable* __restrict t, int steps, float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  int q = t->lower[u >> 16];
  if constexpr (S > 0) {
    for (int s = 0; s < S; ++s) q += t->mid[q] < x;
  } else {
    for (int s = 0; s < steps; ++s) q += t->mid[q] < x;
  }
  return q;
}

// Codes of one block's selected entries (all of them when Dense).
template <int S, bool Dense>
inline void quantize_block(const CodeTable* tm, const CodeTable* tv, const float* m_new, const float* v_new,
                           const bool* sel, float rm, float rv, uint8_t* __restrict mq, uint8_t* __restrict vq,
                           int64_t n) {
  const int sm = tm->steps, sv = tv->steps;  // hoisted: the code stores could alias them otherwise
  for (int64_t jj = 0; jj < n; ++jj) {
    if (!Dense && !sel[jj]) continue;
    mq[jj] = static_cast<uint8_t>(quantize_fast<S>(tm, sm, std::clamp(m_new[jj] * rm, -1.0f, 1.0f)));
    vq[jj] = static_cast<uint8_t>(quantize_fast<S>(tv, sv, std::clamp(v_new[jj] * rv, -1.0f, 1.0f)));
  }
}

template <typename P, typename G, int K>
void update_8bit(const Job& job, int64_t b0, int64_t b1) {
  const AdamWArgs& a = *job.a;
  const Consts& c = job.c;
  P* __restrict p = static_cast<P*>(a.param);
  const G* __restrict g = static_cast<const G*>(a.grad);
  uint8_t* __restrict mq = static_cast<uint8_t*>(a.exp_avg);
  uint8_t* __restrict vq = static_cast<uint8_t*>(a.exp_avg_sq);
  const float* __restrict qm = a.qmap_m;
  const float* __restrict qv = a.qmap_v;
  const CodeTable* tm = job.tm;
  const CodeTable* tv = job.tv;
  const bool one_step = tm->steps <= 1 && tv->steps <= 1;  // an extra step is a no-op, so 1 covers 0
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t j0 = b * kBlock, n = std::min(j0 + kBlock, a.length) - j0;
    float m_new[kBlock], v_new[kBlock];
    bool sel[kBlock];
    bool any = false;
    const float am_old = a.absmax_m[b], av_old = a.absmax_v[b];
    float am = 0.f, av = 0.f;
    if constexpr (K == kDense) {
      // decode (a gather), then the arithmetic and the absmax as straight loops
      for (int64_t jj = 0; jj < n; ++jj) {
        m_new[jj] = qm[mq[j0 + jj]] * am_old;
        v_new[jj] = qv[vq[j0 + jj]] * av_old;
      }
      if constexpr (std::is_same_v<P, float> && std::is_same_v<G, float>) {
        step_run_f32(c, p + j0, g + j0, m_new, v_new, m_new, v_new, n);
      } else {
        for (int64_t jj = 0; jj < n; ++jj)
          step_element(c, p + j0, g + j0, jj, m_new[jj], v_new[jj], &m_new[jj], &v_new[jj]);
      }
      for (int64_t jj = 0; jj < n; ++jj) {
        am = std::max(am, std::fabs(m_new[jj]));
        av = std::max(av, std::fabs(v_new[jj]));
      }
      any = n > 0;
    } else {
      for (int64_t jj = 0; jj < n; ++jj) {
        const int64_t j = j0 + jj;
        int64_t i;
        const float m_old = qm[mq[j]] * am_old;
        const float v_old = qv[vq[j]] * av_old;
        sel[jj] = select<K>(a, j, &i);
        if (sel[jj]) {
          any = true;
          step_element(c, p, g, i, m_old, v_old, &m_new[jj], &v_new[jj]);
          am = std::max(am, std::fabs(m_new[jj]));
          av = std::max(av, std::fabs(v_new[jj]));
        } else {  // unselected entries keep their codes; the block scale must still cover them
          am = std::max(am, std::fabs(m_old));
          av = std::max(av, std::fabs(v_old));
        }
      }
    }
    if (!any) continue;
    a.absmax_m[b] = am;
    a.absmax_v[b] = av;
    const float rm = 1.0f / std::max(am, 1e-38f), rv = 1.0f / std::max(av, 1e-38f);
    if (one_step)
      quantize_block<1, K == kDense>(tm, tv, m_new, v_new, sel, rm, rv, mq + j0, vq + j0, n);
    else
      quantize_block<0, K == kDense>(tm, tv, m_new, v_new, sel, rm, rv, mq + j0, vq + j0, n);
  }
}

template <typename P, typename G, int K>
BlockFn pick_k(int state_dtype) {
  switch (state_dtype) {
    case kF32: return &update_plain<P, G, float, K>;
    case kBF16: return &update_plain<P, G, uint16_t, K>;
    default: return &update_8bit<P, G, K>;
  }
}

template <typename P, typename G>
BlockFn pick_pg(const AdamWArgs& a) {
  if (a.mask_idx) return pick_k<P, G, kIdx>(a.state_dtype);
  if (a.mask_bits) return pick_k<P, G, kBits>(a.state_dtype);
  return pick_k<P, G, kDense>(a.state_dtype);
}

// Advances the step counter and prepares the update (call only for a step that is taken).
Job prepare(const AdamWArgs& a) {
  *a.step += 1.f;
  const double t = *a.step;
  const double c1 = 1.0 - std::pow(a.beta1, t);
  Job job{};
  job.a = &a;
  job.c = Consts{static_cast<float>(a.beta1), static_cast<float>(1.0 - a.beta1),
                 static_cast<float>(a.beta2), static_cast<float>(1.0 - a.beta2),
                 static_cast<float>(1.0 - a.lr * a.weight_decay), static_cast<float>(-a.lr / c1),
                 static_cast<float>(std::sqrt(1.0 - std::pow(a.beta2, t))), static_cast<float>(a.eps)};
  job.blocks = (a.length + kBlock - 1) / kBlock;
  if (a.state_dtype == kU8 && a.length > 0) {
    job.tm = code_table(a.qmap_m);
    job.tv = code_table(a.qmap_v);
  }
  if (a.param_dtype == kF32)
    job.run = a.grad_dtype == kF32 ? pick_pg<float, float>(a) : pick_pg<float, uint16_t>(a);
  else
    job.run = a.grad_dtype == kF32 ? pick_pg<uint16_t, float>(a) : pick_pg<uint16_t, uint16_t>(a);
  return job;
}

// Work is cut into chunks of at most kChunkBlocks state blocks (never across a block, so an 8-bit
// block's absmax stays one thread's), and the chunks of all jobs are split statically over the
// threads: with equal-cost elements each thread gets an equal, mostly contiguous share.
constexpr int64_t kChunkBlocks = 64;
constexpr int64_t kSerialBelow = 1 << 15;  // entries: below this, threads cost more than they save

struct Chunk {
  int32_t job;
  int64_t b0, b1;
};

void run_jobs(const std::vector<Job>& jobs) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (size_t k = 0; k < jobs.size(); ++k) {
    total += jobs[k].a->length;
    for (int64_t b0 = 0; b0 < jobs[k].blocks; b0 += kChunkBlocks)
      chunks.push_back({static_cast<int32_t>(k), b0, std::min(b0 + kChunkBlocks, jobs[k].blocks)});
  }
  const int64_t count = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (total >= kSerialBelow && count > 1)
  for (int64_t q = 0; q < count; ++q) {
    const Job& job = jobs[chunks[q].job];
    job.run(job, chunks[q].b0, chunks[q].b1);
  }
}

// Any non-finite entry in any of the gradients (all entries, masks ignored): one parallel scan over
// chunks of every gradient.
constexpr int64_t kCheckChunk = 1 << 16;

bool any_nonfinite_all(const AdamWArgs* args, int64_t count) {
  struct Span {
    const void* g;
    int64_t n;
    bool bf16;
  };
  std::vector<Span> spans;
  int64_t total = 0;
  for (int64_t k = 0; k < count; ++k) {
    const AdamWArgs& a = args[k];
    const int64_t size = a.grad_dtype == kF32 ? 4 : 2;
    total += a.n;
    for (int64_t i0 = 0; i0 < a.n; i0 += kCheckChunk)
      spans.push_back({static_cast<const char*>(a.grad) + i0 * size, std::min(kCheckChunk, a.n - i0),
                       a.grad_dtype != kF32});
  }
  const int64_t n_spans = static_cast<int64_t>(spans.size());
  int bad = 0;
#pragma omp parallel for reduction(| : bad) schedule(static) if (total >= kSerialBelow && n_spans > 1)
  for (int64_t q = 0; q < n_spans; ++q) {
    const Span& s = spans[q];
    bad |= s.bf16 ? nonfinite_raw_serial(static_cast<const uint16_t*>(s.g), s.n)
                  : nonfinite_raw_serial(static_cast<const float*>(s.g), s.n);
  }
  return bad != 0;
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
  run_jobs({prepare(a)});
}

void masked_adamw_multi_cpu(const AdamWArgs* args, int64_t count, float* found_inf) {
  using namespace cpu;
  if (*found_inf != 0.f) return;
  if (any_nonfinite_all(args, count)) {
    *found_inf = 1.f;
    return;
  }
  std::vector<Job> jobs;
  jobs.reserve(count);
  for (int64_t k = 0; k < count; ++k) jobs.push_back(prepare(args[k]));
  run_jobs(jobs);
}

}  // namespace fasterase
