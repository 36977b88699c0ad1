// Scalar helpers shared by the CPU kernels: storage <-> fp32 conversion and 8-bit code lookup.
#pragma once
#include <cstdint>
#include <cstring>

namespace fasterase {
namespace cpu {

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

template <typename T> inline float load(const T* p, int64_t i);
template <> inline float load<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float load<uint16_t>(const uint16_t* p, int64_t i) { return bf16_to_f32(p[i]); }
template <> inline float load<_Float16>(const _Float16* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T> inline void store(T* p, int64_t i, float x);
template <> inline void store<float>(float* p, int64_t i, float x) { p[i] = x; }
template <> inline void store<uint16_t>(uint16_t* p, int64_t i, float x) { p[i] = f32_to_bf16(x); }
template <> inline void store<_Float16>(_Float16* p, int64_t i, float x) { p[i] = static_cast<_Float16>(x); }

// Index of the nearest code to x (x already scaled into [-1, 1]); ties go to the lower code,
// i.e. the number of code midpoints strictly below x (torch.bucketize over the midpoints).
inline int quantize_code(const float* code, float x) {
  int q = 0;
  for (int s = 128; s > 0; s >>= 1) {
    int c = q + s;
    if (c <= 255 && (code[c - 1] + code[c]) * 0.5f < x) q = c;
  }
  return q;
}

// Calls f(DTypeTag) with a pointer type matching a DType code (kF32, kBF16 as uint16_t, kF16).
#define FASTERASE_DISPATCH_FLOAT(DT, T, ...)                          \
  switch (DT) {                                                       \
    case kF32: { using T = float; __VA_ARGS__; break; }               \
    case kBF16: { using T = uint16_t; __VA_ARGS__; break; }           \
    default: { using T = _Float16; __VA_ARGS__; break; }              \
  }

}  // namespace cpu
}  // namespace fasterase
