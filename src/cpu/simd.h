#pragma once

// Float32 vector loops of the CPU backend. They are compiled once per instruction-set level and
// the best one for the running CPU is picked at load time (GCC/Clang function multiversioning).

namespace tinyserve::cpu::simd {

void axpy(float* y, float a, const float* x, int n);  // y += a * x
void scale(float* y, float a, int n);                 // y *= a

// The two halves of decode attention over a tile of `tokens` key or value rows of length n,
// for the `group` query heads that share them (q and acc: group rows of n, contiguous).
// Each row is read once for all heads, while it is in registers.
//   dot_rows:  scores[g * stride + t] = q[g] . rows[t]
//   axpy_rows: acc[g] += sum_t weights[g * stride + t] * rows[t]
void dot_rows(const float* q, int group, const float* const* rows, int tokens, int n,
              float* scores, int stride);
void axpy_rows(float* acc, int group, const float* weights, int stride,
               const float* const* rows, int tokens, int n);

}  // namespace tinyserve::cpu::simd
