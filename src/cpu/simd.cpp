#include "cpu/simd.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#  define TS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#  define TS_MULTIVERSION
#endif

namespace tinyserve::cpu::simd {

// Sixteen independent partial sums: the compiler vectorises them without reassociating a
// single float reduction.
TS_MULTIVERSION float dot(const float* a, const float* b, int n) {
  float acc[16] = {};
  int d = 0;
  for (; d + 16 <= n; d += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[d + j] * b[d + j];
  }
  float s = 0.0f;
  for (; d < n; ++d) s += a[d] * b[d];
  for (int j = 0; j < 16; ++j) s += acc[j];
  return s;
}

TS_MULTIVERSION void axpy(float* y, float a, const float* x, int n) {
  for (int d = 0; d < n; ++d) y[d] += a * x[d];
}

TS_MULTIVERSION void scale(float* y, float a, int n) {
  for (int d = 0; d < n; ++d) y[d] *= a;
}

}  // namespace tinyserve::cpu::simd
