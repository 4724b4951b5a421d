#pragma once

// What both decode kernels share: the work of one CTA (its sequence, split, KV head, query
// heads and token range) and the epilogue that merges its warps' softmax states and stores the
// result.

#include <cmath>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#include <cooperative_groups.h>
#endif

#include "cuda/attention/params.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/attention/split_plan.cuh"
#include "cuda/attention/state.cuh"

namespace tinyserve::kernels::cuda {

// What one CTA computes: query heads [head0, head0 + heads) of KV head kv_head, over tokens
// [begin, end) of sequence b (split `split`), for query and output row `row`: b in decode, the
// sequence's one query row in a mixed call's decode launch.
struct WorkUnit {
  int b, row, split, kv_head, head0, heads, begin, end;
};

// The token range [begin, end) of split `split` of sequence b for KV head kv_head. Chunks are
// whole multiples of `align` tokens so that only a sequence's last chunk has a partial tile. The
// split count comes from host values; the range from the length read on the device, so a
// captured CUDA graph stays correct when lengths change between replays.
__device__ __forceinline__ void split_range(const DecodeArgs& a, int b, int kv_head, int split,
                                            int align, int& begin, int& end) {
  const int len = a.kv.seq_len(b, kv_head);
  const int first = a.window_left >= 0 ? max(0, len - 1 - a.window_left) : 0;
  const int n = len - first;
  int chunk = (n + a.output.num_splits - 1) / a.output.num_splits;
  chunk = (chunk + align - 1) / align * align;
  begin = min(len, first + split * chunk);
  end = min(len, begin + chunk);
}

// The sequence of launch rank `rank` (blockIdx.z) when the sequences are ordered by the number of
// keys they attend (after the sliding window), longest first, equal ones by index. The thread
// blocks of a grid start in index order, so the longest sequences start first and the shortest
// fill the last wave, where in index order a long sequence that starts late finishes alone
// (on an H200, 64 sequences of 1 to 8k tokens: the launch's tail). Every CTA computes the same
// permutation from the same lengths: each key is (keys attended, clamped to 2^23 - 1) << 8 |
// (255 - index), unique, and a sequence's rank is the number of keys above its own. `keys`:
// shared memory for kLongestFirstMaxBatch words, 16-byte aligned, free until the second
// barrier; `ranked`: shared, read after it. Called by every thread of the CTA.
__device__ __forceinline__ int sequence_by_length(const DecodeArgs& a, int rank,
                                                  std::uint32_t* keys, int* ranked) {
  const int batch = int(gridDim.z), padded = (batch + 3) & ~3;
  for (int i = threadIdx.x; i < padded; i += blockDim.x) {
    std::uint32_t key = 0;  // padding: above no key
    if (i < batch) {
      const int len = a.kv.seq_len(i, 0);
      const int first = a.window_left >= 0 ? max(0, len - 1 - a.window_left) : 0;
      key = (std::uint32_t(min(len - first, (1 << 23) - 1)) << 8) | std::uint32_t(255 - i);
    }
    keys[i] = key;
  }
  if (threadIdx.x == 0) *ranked = rank;  // overwritten below: every rank has a sequence
  __syncthreads();
  for (int i = threadIdx.x; i < batch; i += blockDim.x) {
    const std::uint32_t own = keys[i];
    int above = 0;
    for (int j = 0; j < padded; j += 4) {
      const uint4 k = *reinterpret_cast<const uint4*>(keys + j);
      above += int(k.x > own) + int(k.y > own) + int(k.z > own) + int(k.w > own);
    }
    if (above == rank) *ranked = i;
  }
  __syncthreads();
  return *ranked;
}

// The CTA's work from its position in the grid (kv_heads x head_tiles, splits, batch), in decode,
// for sequence b (blockIdx.z, or its sequence_by_length).
__device__ __forceinline__ WorkUnit work_unit(const DecodeArgs& a, int heads_per_cta, int align,
                                              int b) {
  WorkUnit u;
  u.b = b;
  u.row = u.b;
  u.split = blockIdx.y;
  u.kv_head = blockIdx.x / a.head_tiles;
  u.head0 = u.kv_head * a.group + (blockIdx.x % a.head_tiles) * heads_per_cta;
  u.heads = min(heads_per_cta, u.kv_head * a.group + a.group - u.head0);
  split_range(a, u.b, u.kv_head, u.split, align, u.begin, u.end);
  return u;
}

// work_unit for a kernel that also runs a mixed call's decode launch (a.query_start_loc set):
// there the CTA attends its sequence's query row when the sequence has exactly one, and returns
// false, before anything else is read, when it has another number (the prefill launch, or
// nobody, takes those). Only the tensor-core kernel runs such launches (a mixed call's types are
// the tensor-core prefill kernels'); the CUDA-core kernel takes plain work_unit, since the early
// exit alone would cost it 32 registers (96 to 128 at sm_90a: five CTAs a multiprocessor to
// four).
__device__ __forceinline__ bool mixed_work_unit(const DecodeArgs& a, int heads_per_cta, int align,
                                                int b, WorkUnit& u) {
  int row = b;
  if (a.query_start_loc) {
    const int b = blockIdx.z;
    const int start = query_row_start(a.query_start_loc, a.num_query_rows, b);
    const int end = query_row_end(a.query_start_loc, a.num_query_rows, int(gridDim.z), b, start);
    if (end - start != 1) return false;
    row = start;
  }
  u = work_unit(a, heads_per_cta, align, b);
  u.row = row;
  return true;
}

// Merges the per-warp softmax states kept in shared memory, red_m/red_l [Warps][rows] and
// red_o [Warps][rows][o_stride] (dim used), for rows [0, heads): store(r, d, value, lse2) for
// each element, by the one thread that merged it (a CTA of Warps warps).
template <int Warps, class Store>
__device__ __forceinline__ void merge_warps(const float* red_m, const float* red_l,
                                            const float* red_o, int rows, int dim, int o_stride,
                                            int heads, Store store) {
  for (int i = threadIdx.x; i < heads * dim; i += Warps * 32) {
    const int r = i / dim, d = i - r * dim;
    float value, lse2;
    merge_states<Warps>([&](int w) { return red_m[w * rows + r]; },
                        [&](int w) { return red_l[w * rows + r]; },
                        [&](int w) { return red_o[(w * rows + r) * o_stride + d]; }, value, lse2);
    store(r, d, value, lse2);
  }
}

// merge_warps, storing rows [0, heads) as query heads head0... of output row `row` (split
// `split`'s partial in a split launch).
template <class T, int Warps = kDecodeWarps>
__device__ void merge_warps_and_store(const DecodeArgs& a, const float* red_m, const float* red_l,
                                      const float* red_o, int rows, int dim, int o_stride,
                                      int heads, int head0, int row, int split) {
  merge_warps<Warps>(red_m, red_l, red_o, rows, dim, o_stride, heads,
                     [&](int r, int d, float value, float lse2) {
                       store_output<T>(a.output, row, split, head0 + r, d, value, lse2);
                     });
}

// The split merge inside a split launch whose splits of one (sequence, KV head, head tile) form
// a thread-block cluster along the grid's y (sm_90; see cluster_launch_fits): no partials in
// global memory and no merge launch. Each CTA merges its warps' states as merge_warps_and_store
// does, but keeps the result in shared memory, in place of warp 0's rows of red_o (value of
// element d at column d, the row's log-sum-exp (log2) in the padding column `dim`); after a
// cluster barrier the CTAs split the rows' elements among them, and each element's owner merges
// it over every CTA of the cluster through distributed shared memory and stores the output. A
// second barrier keeps every CTA's shared memory alive until the others have read it. Every CTA
// of the cluster must reach both barriers (no early exit: an empty split merges as lse -inf).
//
// The arithmetic is merge_splits_kernel's for at most kMaxClusterSplits splits (each split then
// alone in its group of merge threads, whose weights meet in a butterfly over the warp's lanes),
// so a row's output has the same bits whichever way its splits merge: a mixed call's decode rows
// (always merged by the kernel) equal a plain decode call's.
template <class T, int Warps>
__device__ void cluster_merge_and_store(const DecodeArgs& a, const float* red_m, const float* red_l,
                                        float* red_o, int rows, int dim, int o_stride, int heads,
                                        int head0, int row) {
  // At the tensor-core kernel's largest head_dim (256) the merge kernel has 8 groups.
  static_assert(kMaxClusterSplits <= 8 && 256 / 4 <= kMergeThreads / 8,
                "each split has a merge group of its own, and the lanes' butterfly adds them");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  // Warp 0's element (r, d) is read in the merge by the thread that stores it only.
  merge_warps<Warps>(red_m, red_l, red_o, rows, dim, o_stride, heads,
                     [&](int r, int d, float value, float lse2) {
                       red_o[r * o_stride + d] = value;
                       if (d == 0) red_o[r * o_stride + dim] = lse2;
                     });
  cluster.sync();
  const int splits = int(cluster.num_blocks()), rank = int(cluster.block_rank());
  const AttentionOutput& o = a.output;
  T* out = static_cast<T*>(o.out) + row * o.out_stride_batch;
  for (int i = rank * Warps * 32 + threadIdx.x; i < heads * dim; i += splits * Warps * 32) {
    const int r = i / dim, d = i - r * dim;
    float lse[kMaxClusterSplits], part[kMaxClusterSplits];
    float m_all = -INFINITY;
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      lse[s] = s < splits ? *cluster.map_shared_rank(red_o + r * o_stride + dim, s) : -INFINITY;
      part[s] = s < splits ? *cluster.map_shared_rank(red_o + r * o_stride + d, s) : 0.0f;
      m_all = fmaxf(m_all, lse[s]);
    }
    // Each split's group state (merge_column from an empty state), its scale to m_all, and the
    // weighted sum in split order; the weights' total in the lanes' butterfly order (the 8 lanes
    // of the splits, the other lanes adding zeros).
    float v = 0.0f, weights[kMaxClusterSplits];
#pragma unroll
    for (int s = 0; s < kMaxClusterSplits; ++s) {
      float m = -INFINITY, w = 0.0f, acc = 0.0f;
      if (lse[s] != -INFINITY) {
        merge_normalised_state<1>(m, w, &acc, lse[s], [&](int) { return part[s]; });
      }
      const float scale = m == -INFINITY ? 0.0f : ptx::exp2_approx(m - m_all);
      float total = 0.0f;
      total += w * scale;
      weights[s] = total;
      v += acc * scale;
    }
    // The merge kernel's groups past the splits add 0 * 0 (which turns a sum of -0 into +0).
    if (merge_shape(dim).groups > kMaxClusterSplits) v += 0.0f * 0.0f;
#pragma unroll
    for (int width = kMaxClusterSplits / 2; width > 0; width /= 2) {
#pragma unroll
      for (int s = 0; s < width; ++s) weights[s] += weights[s + width];
    }
    const float total = weights[0];
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    out[(head0 + r) * o.out_stride_head + d] = from_float<T>(v * inv);
    if (d == 0 && o.lse) {
      o.lse[row * o.lse_stride_batch + (head0 + r) * o.lse_stride_head] =
          total > 0.0f ? (m_all + log2f(total)) * kLn2 : -INFINITY;
    }
  }
  cluster.sync();
#else
  __trap();  // never launched: the host launches clusters only where the kernel has them
#endif
}

}  // namespace tinyserve::kernels::cuda
