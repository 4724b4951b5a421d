#pragma once

// The online-softmax state of one query row, and the merge of states.
//
// A state over a set of keys holds, in the log2 domain: m, the largest score; l, the sum of
// exp2(score - m); and outputs sum(exp2(score - m) * v), which the caller keeps (in registers,
// shared memory or a partial row) and scales alike. States over disjoint key sets merge exactly,
// in any order: that is how warps of a CTA, splits of a sequence and (later) the pieces of a
// prefill combine. Scores enter as logit * log2(e), so exp2 stands for exp.

#include <cmath>

#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A log-sum-exp in the log2 domain as the natural log-sum-exp callers see (-inf stays -inf).
__device__ __forceinline__ float natural_lse(float lse2) {
  return lse2 == -INFINITY ? -INFINITY : lse2 * kLn2;
}

// Adds one score to the state (m, l). Returns the factor the caller's outputs must be scaled by
// before it adds p * v, with p (out) the new key's weight.
__device__ __forceinline__ float softmax_add(float& m, float& l, float score, float& p) {
  const float m_new = fmaxf(m, score);
  const float correction = ptx::exp2_approx(m - m_new);
  p = ptx::exp2_approx(score - m_new);
  l = l * correction + p;
  m = m_new;
  return correction;
}

// Merges into the running state (m, w, acc[0..V)) a state given by its log-sum-exp `lse` (log2)
// and its normalised outputs value(0..V): the running maximum is raised only when lse exceeds
// it. A running state starts as (-inf, 0, 0); an empty state (lse -inf) must not be merged.
template <int V, class Value>
__device__ __forceinline__ void merge_normalised_state(float& m, float& w, float* acc, float lse,
                                                       Value value) {
  if (lse > m) {
    const float correction = ptx::exp2_approx(m - lse);  // 0 while m is -inf
    w *= correction;
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] *= correction;
    m = lse;
  }
  const float weight = ptx::exp2_approx(lse - m);
  w += weight;
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] += weight * value(j);
}

// Merges N states given as (max m_of(i), sum l_of(i), output o_of(i)) into one normalised output
// and its log-sum-exp (log2); with every state empty, value 0 and lse2 -inf.
template <int N, class M, class L, class O>
__device__ __forceinline__ void merge_states(M m_of, L l_of, O o_of, float& value, float& lse2) {
  float m = -INFINITY;
  for (int i = 0; i < N; ++i) m = fmaxf(m, m_of(i));
  value = 0.0f;
  lse2 = -INFINITY;
  if (m != -INFINITY) {
    float l = 0.0f, acc = 0.0f;
    for (int i = 0; i < N; ++i) {
      const float scale = ptx::exp2_approx(m_of(i) - m);
      l += l_of(i) * scale;
      acc += o_of(i) * scale;
    }
    value = acc / l;
    lse2 = m + log2f(l);
  }
}

}  // namespace tinyserve::kernels::cuda
