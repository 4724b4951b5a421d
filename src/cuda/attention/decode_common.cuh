#pragma once

// What both decode kernels share: the work of one CTA (its sequence, split, KV head, query
// heads and token range) and the epilogue that merges its warps' softmax states and stores the
// result.

#include <cmath>

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

// Merges the per-warp softmax states kept in shared memory, red_m/red_l [kDecodeWarps][rows] and
// red_o [kDecodeWarps][rows][o_stride] (dim used), and stores rows [0, heads) as query heads
// head0... of output row `row`.
template <class T>
__device__ void merge_warps_and_store(const DecodeArgs& a, const float* red_m, const float* red_l,
                                      const float* red_o, int rows, int dim, int o_stride,
                                      int heads, int head0, int row, int split) {
  for (int i = threadIdx.x; i < heads * dim; i += kDecodeThreads) {
    const int r = i / dim, d = i - r * dim;
    float value, lse2;
    merge_states<kDecodeWarps>(
        [&](int w) { return red_m[w * rows + r]; }, [&](int w) { return red_l[w * rows + r]; },
        [&](int w) { return red_o[(w * rows + r) * o_stride + d]; }, value, lse2);
    store_output<T>(a.output, row, split, head0 + r, d, value, lse2);
  }
}

}  // namespace tinyserve::kernels::cuda
