// Vector helpers shared by the C++ CPU kernels (cpu_paged_attention.cc, cpu_matmul.cc).
//
// 16 floats are one AVX-512 register (two AVX2 ones); GCC's vector extensions lower the
// arithmetic to what the target has. Vec16 needs only float alignment.

#ifndef JAXLLM_CPU_SIMD_H_
#define JAXLLM_CPU_SIMD_H_

#include <cmath>
#include <cstdint>
#include <cstring>

namespace jaxllm_cpu {

typedef float Vec16 __attribute__((vector_size(64), aligned(4), may_alias));
typedef int32_t Vec16i __attribute__((vector_size(64), aligned(4), may_alias));

// e^x for x <= 0, Cephes' single-precision polynomial (about 1 ulp). Arguments below -87 give
// e^-87 (~1.6e-38), not 0.
inline float ExpNonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const float y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                     4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r +
                  r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return y * two_n;
}

// The same for 16 lanes at once (GCC does not vectorise the scalar one: its floor and bit cast).
inline Vec16 ExpNonpositive(Vec16 x) {
  const Vec16 lowest = Vec16{} - 87.0f;
  x = x < lowest ? lowest : x;
  const Vec16 t = x * 1.44269504088896341f + 0.5f;
  Vec16 n = __builtin_convertvector(__builtin_convertvector(t, Vec16i), Vec16);  // toward zero
  n = n > t ? n - 1.0f : n;                                                       // floor
  const Vec16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  const Vec16 y = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                     4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r +
                  r + 1.0f;
  const Vec16i bits = (__builtin_convertvector(n, Vec16i) + 127) << 23;
  return y * reinterpret_cast<Vec16>(bits);  // a bit cast between same-size vectors
}

// Loads and stores through the vector type, not memcpy: GCC, preferring 256-bit moves on recent
// Intel cores, lowers a 64-byte memcpy to two ymm stores to the stack and one zmm reload, a
// store-forwarding stall on every access (decode attention measured ~6x slower so on a CPU
// whose -march=native tuning does that).
inline Vec16 Load16(const float* x) { return *reinterpret_cast<const Vec16*>(x); }
inline void Store16(float* x, Vec16 v) { *reinterpret_cast<Vec16*>(x) = v; }

}  // namespace jaxllm_cpu

#endif  // JAXLLM_CPU_SIMD_H_
