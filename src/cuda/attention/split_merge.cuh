#pragma once

// Attention outputs, and the merge of split partials (flash-decoding's second kernel).
//
// An attention kernel that splits a row's keys writes, per split, a float32 partial (the
// normalised output over its keys) and its log-sum-exp (log2) to the caller's workspace; unsplit,
// it writes the output and the natural log-sum-exp directly. merge_splits_kernel combines the
// partials of every row. Rows are (sequence, query head).

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "core/kernels.h"
#include "cuda/attention/state.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

struct AttentionOutput {
  void* out;  // [batch, num_q_heads, head_dim], the call's element type
  std::int64_t out_stride_batch, out_stride_head;
  float* lse;  // optional [batch, num_q_heads], natural log
  std::int64_t lse_stride_batch, lse_stride_head;
  float* part_out;  // [num_splits, batch, num_q_heads, head_dim], when num_splits > 1
  float* part_lse;  // [num_splits, batch, num_q_heads], log2 domain
  // Rows of the output: the sequences in decode, the query rows with query_start_loc.
  int batch, num_q_heads, head_dim;
  int num_splits;
};

inline AttentionOutput make_attention_output(const PagedAttentionParams& p) {
  const int rows = p.query_start_loc ? int(p.num_query_rows) : p.batch;
  AttentionOutput o{};
  o.out = p.out;
  o.out_stride_batch = p.out_stride_batch;
  o.out_stride_head = p.out_stride_head;
  o.lse = p.lse;
  o.lse_stride_batch = p.lse_stride_batch;
  o.lse_stride_head = p.lse_stride_head;
  if (p.num_splits > 1) {
    o.part_out = static_cast<float*>(p.workspace);
    o.part_lse = reinterpret_cast<float*>(
        static_cast<char*>(p.workspace) +
        attention_partials_bytes(p.num_splits, rows, p.num_q_heads, p.head_dim));
  }
  o.batch = rows;
  o.num_q_heads = p.num_q_heads;
  o.head_dim = p.head_dim;
  o.num_splits = p.num_splits;
  return o;
}

// Writes element d of row (b, h) for split `split`: `value` normalised, `lse2` in log2 domain.
template <class T>
__device__ __forceinline__ void store_output(const AttentionOutput& o, int b, int split, int h,
                                             int d, float value, float lse2) {
  if (o.num_splits == 1) {
    T* out = static_cast<T*>(o.out) + b * o.out_stride_batch + h * o.out_stride_head;
    out[d] = from_float<T>(value);
    if (d == 0 && o.lse) o.lse[b * o.lse_stride_batch + h * o.lse_stride_head] = natural_lse(lse2);
  } else {
    const std::int64_t row = (std::int64_t(split) * o.batch + b) * o.num_q_heads + h;
    o.part_out[row * o.head_dim + d] = value;
    if (d == 0) o.part_lse[row] = lse2;
  }
}

// The merge: one CTA of kMergeThreads per row.
//
// Thread t owns column t % cols (a float4 column where head_dim allows) of every groups-th split
// from t / cols on. It loads its splits' log-sum-exps and partial rows together, a batch of
// kMergeBatch splits at a time (one batch covers up to groups * kMergeBatch splits: 64 at
// head_dim 128), and merges them online; the groups' states then meet in shared memory.
constexpr int kMergeThreads = 512;
constexpr int kMergeBatch = 4;
static_assert(kMaxAttentionHeadDim <= kMergeThreads, "a merge thread owns at most one column");

struct MergeShape {
  int vec, cols, groups;
};

__host__ __device__ inline MergeShape merge_shape(int head_dim) {
  MergeShape m;
  m.vec = head_dim % 4 == 0 ? 4 : 1;
  m.cols = head_dim / m.vec;
  m.groups = kMergeThreads / m.cols;
  return m;
}

// Shared memory of the merge kernel: per group, its running max and weight, and its column sums.
inline std::size_t merge_smem_bytes(int head_dim) {
  const MergeShape m = merge_shape(head_dim);
  return std::size_t(m.groups) * (2 + head_dim) * sizeof(float);
}

template <int V>
struct MergeVec;
template <>
struct MergeVec<4> {
  using type = float4;
  static __device__ __forceinline__ float get(const float4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
  }
};
template <>
struct MergeVec<1> {
  using type = float;
  static __device__ __forceinline__ float get(float v, int) { return v; }
};

// Merges this thread's splits of column c online into (m, w, acc[V]), which stay as they were
// when its group has no split.
template <int V>
__device__ __forceinline__ void merge_column(const AttentionOutput& o, const float* part,
                                             std::int64_t row, std::int64_t stride, int group,
                                             int groups, int c, float& m, float& w, float* acc) {
  using Vec = typename MergeVec<V>::type;
  const std::int64_t split_stride = stride * o.head_dim;
  for (int s0 = group; s0 < o.num_splits; s0 += groups * kMergeBatch) {
    float lse[kMergeBatch];
    Vec p[kMergeBatch];
#pragma unroll
    for (int i = 0; i < kMergeBatch; ++i) {  // every load of the batch before any use
      const int s = s0 + i * groups;
      lse[i] = s < o.num_splits ? o.part_lse[s * stride + row] : -INFINITY;
      if (s < o.num_splits) p[i] = *reinterpret_cast<const Vec*>(part + s * split_stride + V * c);
    }
#pragma unroll
    for (int i = 0; i < kMergeBatch; ++i) {
      if (lse[i] == -INFINITY) continue;  // an empty split, or none
      merge_normalised_state<V>(m, w, acc, lse[i],
                                [&](int j) { return MergeVec<V>::get(p[i], j); });
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kMergeThreads)
    merge_splits_kernel(const __grid_constant__ AttentionOutput o) {
  extern __shared__ __align__(16) float merge_smem[];
  const MergeShape shape = merge_shape(o.head_dim);
  float* group_m = merge_smem;              // [groups]
  float* group_w = group_m + shape.groups;  // [groups]
  float* sums = group_w + shape.groups;     // [groups][head_dim]
  ptx::wait_for_previous_grid();            // launched while the decode kernel finishes
  const int b = blockIdx.x / o.num_q_heads, h = blockIdx.x % o.num_q_heads;
  const std::int64_t stride = std::int64_t(o.batch) * o.num_q_heads;
  const std::int64_t row = std::int64_t(b) * o.num_q_heads + h;
  const float* part = o.part_out + row * o.head_dim;
  const int group = threadIdx.x / shape.cols, c = threadIdx.x % shape.cols;
  if (group < shape.groups) {
    float m = -INFINITY, w = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (shape.vec == 4) {
      merge_column<4>(o, part, row, stride, group, shape.groups, c, m, w, acc);
    } else {
      merge_column<1>(o, part, row, stride, group, shape.groups, c, m, w, acc);
    }
    for (int j = 0; j < shape.vec; ++j) sums[group * o.head_dim + shape.vec * c + j] = acc[j];
    if (c == 0) {  // every column of a group sees the same splits: one thread records them
      group_m[group] = m;
      group_w[group] = w;
    }
  }
  __syncthreads();
  // Every warp finds the largest group max and the total weight itself (lanes stride over the
  // groups, then shuffle), so no further barrier is needed; an empty group scales to 0.
  const int lane = threadIdx.x % 32;
  float m_all = -INFINITY;
  for (int g = lane; g < shape.groups; g += 32) m_all = fmaxf(m_all, group_m[g]);
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) {
    m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, mask));
  }
  auto scale_of = [&](int g) {
    const float mg = group_m[g];
    return mg == -INFINITY ? 0.0f : ptx::exp2_approx(mg - m_all);
  };
  float total = 0.0f;
  for (int g = lane; g < shape.groups; g += 32) total += group_w[g] * scale_of(g);
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) total += __shfl_xor_sync(0xffffffffu, total, mask);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  T* out = static_cast<T*>(o.out) + b * o.out_stride_batch + h * o.out_stride_head;
  for (int d = threadIdx.x; d < o.head_dim; d += kMergeThreads) {
    float v = 0.0f;
#pragma unroll 8
    for (int g = 0; g < shape.groups; ++g) v += sums[g * o.head_dim + d] * scale_of(g);
    out[d] = from_float<T>(v * inv);
  }
  if (threadIdx.x == 0 && o.lse) {
    o.lse[b * o.lse_stride_batch + h * o.lse_stride_head] =
        total > 0.0f ? (m_all + log2f(total)) * kLn2 : -INFINITY;
  }
}

}  // namespace tinyserve::kernels::cuda
