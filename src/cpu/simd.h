#pragma once

// Vector loops of the CPU backend. They are compiled once per instruction-set level and
// the best one for the running CPU is picked at load time (GCC/Clang function multiversioning).

#include <cstdint>

#include "cpu/dtypes.h"

namespace tinyserve::cpu::simd {

// 16-bit rows to float32, exactly as the scalar to_float of dtypes.h (float16 through the F16C
// instructions where the CPU has them, which return a signalling NaN quietened).
void to_float(const half_t* src, float* dst, int n);
void to_float(const bfloat16_t* src, float* dst, int n);
bool hardware_float16();  // float16 goes through F16C on this CPU

void axpy(float* y, float a, const float* x, int n);  // y += a * x

// The softmax weights of one tile of scores: s[t] = exp(s[t] - m) for t < n, where m >= every
// s[t] (a score of -inf gives 0); returns their sum. Within 2 ulp of std::exp.
float exp_shifted_sum(float* s, int n, float m);
void scale(float* y, float a, int n);  // y *= a

// The two halves of decode attention, for the `group` query heads that share each KV head (q and
// acc: one row of n per query head, contiguous, grouped by KV head). Each key or value chunk is
// loaded once for all heads of its group, while they are in registers.
//   dot_token: one token's scores for all KV heads: the key row of KV head h is at
//              k + h * head_stride, and scores[(h * group + g) * stride] = q[h * group + g] . k_h
//   axpy_rows: one KV head over a tile of `tokens` value rows:
//              acc[g] += sum_t weights[g * stride + t] * rows[t]
void dot_token(const float* q, int kv_heads, int group, const float* k, std::int64_t head_stride,
               int n, float* scores, int stride);
void axpy_rows(float* acc, int group, const float* weights, int stride, const float* const* rows,
               int tokens, int n);
// The scores of `count` query rows (q, one row of n each, contiguous) against a tile of `tokens`
// key rows: scores[g * stride + t] = q[g] . rows[t]. Blocks of four queries by two keys share
// every load, so a tile of prefill rows costs fewer loads per product than dot_token per key.
void dot_tile(const float* q, int count, const float* const* rows, int tokens, int n, float* scores,
              int stride);

}  // namespace tinyserve::cpu::simd
