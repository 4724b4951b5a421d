#pragma once

// The decode kernels' arguments, built once per call from the core's PagedAttentionParams by
// make_decode_args: the paged view of the caches, the outputs, and the values derived on the host
// (the GQA group, the logit transform). Both decode kernels and the split merge read them from
// the kernel parameter space (__grid_constant__), so nothing is copied to the device first.
//
// Also here: how every attention kernel reads a sequence's query rows from query_start_loc, so
// that the decode and prefill kernels of one mixed call agree on them whatever it holds.

#include <cstdint>

#include "core/kernels.h"
#include "cuda/attention/page.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/attention/state.cuh"

namespace tinyserve::kernels::cuda {

// The CUDA-core decode kernel's CTA, and the tensor-core one's by default: 4 warps (the
// tensor-core kernel's configurations with 128-token tiles take 8: MmaConfig).
constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

struct DecodeArgs {
  const void* query;  // [batch, num_q_heads, head_dim], or [num_query_rows, ...] when mixed
  std::int64_t q_stride_batch, q_stride_head;
  // Null in decode. In a mixed call's decode launch, the query rows' offsets ([batch + 1]): a CTA
  // attends its sequence's row when that sequence has exactly one, and else writes nothing
  // (the prefill launch takes the others).
  const std::int32_t* query_start_loc;
  int num_query_rows;
  // Decode launches of the tensor-core kernel over one length per sequence (2 to
  // kLongestFirstMaxBatch sequences): blockIdx.z is a rank, the sequences ordered by the number
  // of keys they attend, longest first (ties by index), so that the longest start first and the
  // launch's last wave is short (see sequence_by_length). Other kernels ignore it.
  bool longest_first;
  PagedKV kv;
  AttentionOutput output;
  int group;       // query heads per KV head
  int head_tiles;  // CTAs per KV head along the group
  int window_left;
  // logit (log2 domain) = post * tanh(q.k * pre) with a soft cap, else q.k * pre
  float pre, post;
  bool soft_cap;
  // Float8 caches: a stored K (V) element stands for stored * scale; per_head read from device
  // memory when set.
  ScaleArg k_scale, v_scale;

  __device__ __forceinline__ float logit(float qk) const {
    return soft_cap ? post * tanhf(qk * pre) : qk * pre;
  }
};

// Sequence b's query rows [query_row_start, query_row_end) of num_query_rows, as the kernels
// trust query_start_loc: offsets clamped to [0, num_query_rows], the first sequence starting at
// row 0, the last ending at the last row, and no sequence ending before it starts (valid offsets
// are all that already). So no row outside the query and output is touched whatever the device
// holds, and every kernel of a call sees the same rows.
__device__ __forceinline__ int query_row_start(const std::int32_t* query_start_loc,
                                               int num_query_rows, int b) {
  return b == 0 ? 0 : min(max(query_start_loc[b], 0), num_query_rows);
}
__device__ __forceinline__ int query_row_end(const std::int32_t* query_start_loc,
                                             int num_query_rows, int batch, int b, int start) {
  return b == batch - 1 ? num_query_rows : min(max(query_start_loc[b + 1], start), num_query_rows);
}

// The arguments of a launch whose CTAs each take up to heads_per_cta query heads of a group
// (query_start_loc left null: see DecodeArgs).
inline DecodeArgs make_decode_args(const PagedAttentionParams& p, int heads_per_cta) {
  DecodeArgs a{};
  a.query = p.query;
  a.q_stride_batch = p.q_stride_batch;
  a.q_stride_head = p.q_stride_head;
  a.kv = make_paged_kv(p);
  a.output = make_attention_output(p);
  a.group = p.num_q_heads / p.num_kv_heads;
  a.head_tiles = (a.group + heads_per_cta - 1) / heads_per_cta;
  a.window_left = p.window_left;
  a.soft_cap = p.logits_soft_cap > 0.0f;
  a.pre = a.soft_cap ? p.scale / p.logits_soft_cap : p.scale * kLog2e;
  a.post = a.soft_cap ? p.logits_soft_cap * kLog2e : 1.0f;
  a.k_scale = p.k_scale;
  a.v_scale = p.v_scale;
  return a;
}

}  // namespace tinyserve::kernels::cuda
