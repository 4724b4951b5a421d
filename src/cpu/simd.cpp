#include "cpu/simd.h"

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && defined(__linux__)
#define TS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define TS_MULTIVERSION
#endif

// float16 to float32 in hardware where the CPU has F16C (checked at run time), else portably.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define TS_X86_F16C 1
#include <immintrin.h>
#else
#define TS_X86_F16C 0
#endif

// Helpers are inlined into each clone so that they are compiled for its instruction set. Like the
// vector type below, this needs GCC or Clang (or a compiler compatible with them).
#define TS_INLINE inline __attribute__((always_inline))

namespace tinyserve::cpu::simd {

namespace {

// Branch-free, so that the loop vectorises: each case computed, then selected. Subnormals are
// converted through an exact integer-to-float conversion (mantissa * 2^-24).
TS_MULTIVERSION void half_to_float_portable(const half_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) {
    const std::uint32_t h = src[i].bits;
    const std::uint32_t exp = (h >> 10) & 0x1fu;
    const std::uint32_t mant = h & 0x3ffu;
    const float subnormal = float(std::int32_t(mant)) * 0x1p-24f;
    std::uint32_t u;
    std::memcpy(&u, &subnormal, 4);
    // All-ones masks select the normal, then the inf/nan encoding.
    const std::uint32_t is_normal = 0u - std::uint32_t(exp != 0);
    const std::uint32_t is_inf_nan = 0u - std::uint32_t(exp == 0x1fu);
    u = (u & ~is_normal) | ((((exp + 112) << 23) | (mant << 13)) & is_normal);
    u = (u & ~is_inf_nan) | ((0x7f800000u | (mant << 13)) & is_inf_nan);
    u |= (h & 0x8000u) << 16;
    std::memcpy(&dst[i], &u, 4);
  }
}

#if TS_X86_F16C
// The F16C instruction converts eight halves in one step, exactly (subnormals included); the
// portable loop above takes about fifteen integer operations per element, which made float16
// attention twice as slow as float32 although it reads half the bytes.
__attribute__((target("avx,f16c"))) void half_to_float_f16c(const half_t* src, float* dst, int n) {
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    __m128i h;
    std::memcpy(&h, src + i, sizeof h);
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(h));
  }
  if (i < n) half_to_float_portable(src + i, dst + i, n - i);
}

bool cpu_has_f16c() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
#endif

}  // namespace

bool hardware_float16() {
#if TS_X86_F16C
  static const bool f16c = cpu_has_f16c();
  return f16c;
#else
  return false;
#endif
}

void to_float(const half_t* src, float* dst, int n) {
#if TS_X86_F16C
  if (hardware_float16()) return half_to_float_f16c(src, dst, n);
#endif
  half_to_float_portable(src, dst, n);
}

TS_MULTIVERSION void to_float(const bfloat16_t* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) {
    const std::uint32_t u = std::uint32_t(src[i].bits) << 16;
    std::memcpy(&dst[i], &u, 4);
  }
}

TS_MULTIVERSION void axpy(float* y, float a, const float* x, int n) {
  for (int d = 0; d < n; ++d) y[d] += a * x[d];
}

TS_MULTIVERSION void scale(float* y, float a, int n) {
  for (int d = 0; d < n; ++d) y[d] *= a;
}

namespace {

// Eight floats: one AVX register in the x86-64-v3 clone, two SSE registers in the baseline one.
// GCC/Clang vector types, so that the register blocking below is what the compiler emits rather
// than what its auto-vectoriser might find.
typedef float f32x8 __attribute__((vector_size(32)));
// The helpers below are always inlined, so no f32x8 crosses a call and GCC's warning that the
// baseline clone returns one differently from AVX code does not apply. (Parameters are taken by
// reference: by value they draw a note that this pragma does not silence.)
#pragma GCC diagnostic ignored "-Wpsabi"

TS_INLINE f32x8 load8(const float* p) {
  f32x8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

TS_INLINE void store8(float* p, const f32x8& v) { std::memcpy(p, &v, sizeof v); }

TS_INLINE float sum8(const f32x8& v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Scores of G query heads against one key row. Sixteen partial sums per head (two registers),
// so 2 * G independent FMA chains hide the FMA latency, and each key chunk is loaded once for
// all G heads.
template <int G>
TS_INLINE void dot_heads(const float* q, int n, const float* k, float* scores, int stride) {
  f32x8 acc[G][2];  // zeroed in a loop: "= {}" made GCC 12 clear a stack copy with rep stosq
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = f32x8{};
  int d = 0;
  for (; d + 16 <= n; d += 16) {
    const f32x8 k0 = load8(k + d), k1 = load8(k + d + 8);
    for (int g = 0; g < G; ++g) {
      acc[g][0] += load8(q + g * n + d) * k0;
      acc[g][1] += load8(q + g * n + d + 8) * k1;
    }
  }
  for (int g = 0; g < G; ++g) scores[g * stride] = sum8(acc[g][0] + acc[g][1]);
  for (; d < n; ++d) {
    for (int g = 0; g < G; ++g) scores[g * stride] += q[g * n + d] * k[d];
  }
}

// acc of G heads += the tile's weighted value rows. A 16-wide slice of each head's accumulator
// stays in registers through the whole tile, so accumulators are loaded and stored once per
// tile instead of once per token, and each value chunk is loaded once for all G heads.
template <int G>
TS_INLINE void axpy_heads(float* acc, int n, const float* w, int stride, const float* const* rows,
                          int tokens) {
  int d = 0;
  for (; d + 16 <= n; d += 16) {
    f32x8 a[G][2];
    for (int g = 0; g < G; ++g) {
      a[g][0] = load8(acc + g * n + d);
      a[g][1] = load8(acc + g * n + d + 8);
    }
    for (int t = 0; t < tokens; ++t) {
      const f32x8 v0 = load8(rows[t] + d), v1 = load8(rows[t] + d + 8);
      for (int g = 0; g < G; ++g) {
        const float wt = w[g * stride + t];
        a[g][0] += wt * v0;
        a[g][1] += wt * v1;
      }
    }
    for (int g = 0; g < G; ++g) {
      store8(acc + g * n + d, a[g][0]);
      store8(acc + g * n + d + 8, a[g][1]);
    }
  }
  for (; d < n; ++d) {
    for (int g = 0; g < G; ++g) {
      float a = acc[g * n + d];
      for (int t = 0; t < tokens; ++t) a += w[g * stride + t] * rows[t][d];
      acc[g * n + d] = a;
    }
  }
}

// The sums of eight vectors, as one vector (lane i = sum of a[i]): three rounds of pairwise
// shuffles and adds instead of eight separate horizontal sums.
TS_INLINE f32x8 sum8x8(const f32x8* a) {
  f32x8 b[4], c[2];
  for (int i = 0; i < 4; ++i) {
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  }
  for (int i = 0; i < 2; ++i) {
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// Scores of G queries against T key rows, one accumulator per pair: each chunk of a key row is
// loaded once for G queries and each chunk of a query once for T keys.
template <int G, int T>
TS_INLINE void dot_block(const float* q, int n, const float* const* rows, float* scores,
                         int stride) {
  f32x8 acc[G * T];
  for (int i = 0; i < G * T; ++i) acc[i] = f32x8{};
  int d = 0;
  for (; d + 8 <= n; d += 8) {
    f32x8 k[T];
    for (int t = 0; t < T; ++t) k[t] = load8(rows[t] + d);
    for (int g = 0; g < G; ++g) {
      const f32x8 qv = load8(q + g * n + d);
      for (int t = 0; t < T; ++t) acc[g * T + t] += qv * k[t];
    }
  }
  if constexpr (G * T == 8) {
    const f32x8 sums = sum8x8(acc);
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < T; ++t) scores[g * stride + t] = sums[g * T + t];
    }
  } else {
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < T; ++t) scores[g * stride + t] = sum8(acc[g * T + t]);
    }
  }
  for (; d < n; ++d) {
    for (int g = 0; g < G; ++g) {
      for (int t = 0; t < T; ++t) scores[g * stride + t] += q[g * n + d] * rows[t][d];
    }
  }
}

template <int G>
TS_INLINE void dot_block_row(const float* q, int n, const float* const* rows, int tokens,
                             float* scores, int stride) {
  int t = 0;
  for (; t + 2 <= tokens; t += 2) dot_block<G, 2>(q, n, rows + t, scores + t, stride);
  if (t < tokens) dot_block<G, 1>(q, n, rows + t, scores + t, stride);
}

// exp(x) for x <= 0 as 2^k * exp(r), k = round(x / ln 2), |r| <= ln(2) / 2, with a degree-6
// polynomial for exp(r) (the minimax coefficients of the Cephes library's expf). Below -87 the
// result is 0 (float32 would be subnormal there; -inf lands here too).
TS_INLINE f32x8 exp_nonpositive8(const f32x8& x) {
  typedef std::int32_t i32x8 __attribute__((vector_size(32)));
  const f32x8 clamped = x < -87.0f ? f32x8{} - 87.0f : x;  // keeps k >= -126 (normal 2^k)
  // Round to nearest through the float mantissa: adding 1.5 * 2^23 leaves the integer part.
  const f32x8 shifter = f32x8{} + 12582912.0f;
  const f32x8 k = (clamped * 1.44269504088896341f + shifter) - shifter;
  const f32x8 r = (clamped - k * 0.693359375f) - k * -2.12194440e-4f;
  f32x8 p = f32x8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const i32x8 bits = (__builtin_convertvector(k, i32x8) + 127) << 23;
  f32x8 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const f32x8 y = p * scale;
  const i32x8 keep = x >= -87.0f;  // all ones where kept
  i32x8 out;
  std::memcpy(&out, &y, sizeof out);
  out &= keep;
  f32x8 result;
  std::memcpy(&result, &out, sizeof result);
  return result;
}

}  // namespace

TS_MULTIVERSION float exp_shifted_sum(float* s, int n, float m) {
  f32x8 sum{};
  int t = 0;
  for (; t + 8 <= n; t += 8) {
    const f32x8 e = exp_nonpositive8(load8(s + t) - m);
    store8(s + t, e);
    sum += e;
  }
  if (t < n) {
    float rest[8];
    for (int i = 0; i < 8; ++i) rest[i] = t + i < n ? s[t + i] - m : -INFINITY;
    const f32x8 e = exp_nonpositive8(load8(rest));
    store8(rest, e);
    for (int i = 0; t + i < n; ++i) s[t + i] = rest[i];
    sum += e;
  }
  return sum8(sum);
}

// Query heads in blocks of four (eight accumulator registers), then the remainder.
TS_MULTIVERSION void dot_token(const float* q, int kv_heads, int group, const float* k,
                               std::int64_t head_stride, int n, float* scores, int stride) {
  for (int h = 0; h < kv_heads; ++h) {
    const float* qh = q + std::int64_t(h) * group * n;
    const float* kh = k + h * head_stride;
    float* s = scores + std::int64_t(h) * group * stride;
    int g = 0;
    for (; g + 4 <= group; g += 4) dot_heads<4>(qh + g * n, n, kh, s + g * stride, stride);
    const int rest = group - g;
    if (rest == 3) dot_heads<3>(qh + g * n, n, kh, s + g * stride, stride);
    if (rest == 2) dot_heads<2>(qh + g * n, n, kh, s + g * stride, stride);
    if (rest == 1) dot_heads<1>(qh + g * n, n, kh, s + g * stride, stride);
  }
}

TS_MULTIVERSION void dot_tile(const float* q, int count, const float* const* rows, int tokens,
                              int n, float* scores, int stride) {
  int g = 0;
  for (; g + 4 <= count; g += 4) {
    dot_block_row<4>(q + std::int64_t(g) * n, n, rows, tokens, scores + g * stride, stride);
  }
  const int rest = count - g;
  const float* qg = q + std::int64_t(g) * n;
  if (rest == 3) dot_block_row<3>(qg, n, rows, tokens, scores + g * stride, stride);
  if (rest == 2) dot_block_row<2>(qg, n, rows, tokens, scores + g * stride, stride);
  if (rest == 1) dot_block_row<1>(qg, n, rows, tokens, scores + g * stride, stride);
}

TS_MULTIVERSION void axpy_rows(float* acc, int group, const float* weights, int stride,
                               const float* const* rows, int tokens, int n) {
  int g = 0;
  for (; g + 4 <= group; g += 4) {
    axpy_heads<4>(acc + g * n, n, weights + g * stride, stride, rows, tokens);
  }
  const int rest = group - g;
  if (rest == 3) axpy_heads<3>(acc + g * n, n, weights + g * stride, stride, rows, tokens);
  if (rest == 2) axpy_heads<2>(acc + g * n, n, weights + g * stride, stride, rows, tokens);
  if (rest == 1) axpy_heads<1>(acc + g * n, n, weights + g * stride, stride, rows, tokens);
}

}  // namespace tinyserve::cpu::simd
