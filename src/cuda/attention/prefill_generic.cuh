#pragma once

// The CUDA-core prefill kernel: query rows with query_start_loc (prefill, append, chunked
// prefill, decode rows mixed in), any dtype, head_dim up to kMaxAttentionHeadDim. One CTA of 4
// warps per (query row, KV head, tile of up to 8 query heads of its group) attends the row's
// causal (windowed) keys, a warp per token, like the CUDA-core decode kernel; no splits. A
// correct path for every shape, not a fast one: each row reads its keys on its own (a
// tensor-core kernel over tiles of rows is the fast path still to come).

#include <cmath>
#include <cstdint>

#include "core/kernels.h"
#include "cuda/attention/decode_common.cuh"
#include "cuda/attention/decode_generic.cuh"
#include "cuda/attention/params.cuh"
#include "cuda/attention/state.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

struct PrefillArgs {
  DecodeArgs d;  // q_stride_batch and the outputs' batch strides step over query rows
  const std::int32_t* query_start_loc;  // [batch + 1] in device memory, never trusted
  int batch;
  int tiles_per_row;  // num_kv_heads * head_tiles
};

inline PrefillArgs make_prefill_args(const PagedAttentionParams& p, int heads_per_cta) {
  PrefillArgs a{};
  a.d = make_decode_args(p, heads_per_cta);
  a.query_start_loc = p.query_start_loc;
  a.batch = p.batch;
  a.tiles_per_row = p.num_kv_heads * a.d.head_tiles;
  return a;
}

// The sequence that owns query row `row`: the last b with query_start_loc[b] <= row. Offsets
// that are not sorted give some b in [0, batch); the caller then finds the row outside it.
__device__ __forceinline__ int sequence_of_row(const PrefillArgs& a, int row) {
  int lo = 0, hi = a.batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (a.query_start_loc[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

template <class T>
__global__ void __launch_bounds__(kDecodeThreads)
    prefill_generic_kernel(const __grid_constant__ PrefillArgs pa) {
  extern __shared__ __align__(16) unsigned char smem[];
  const DecodeArgs& a = pa.d;
  const int D = a.output.head_dim;
  float* q_smem = reinterpret_cast<float*>(smem);         // [kGenericHeads][D]
  float* acc = q_smem + kGenericHeads * D;                // [kDecodeWarps][kGenericHeads][D]
  float* red_m = acc + kDecodeWarps * kGenericHeads * D;  // [kDecodeWarps][kGenericHeads]
  float* red_l = red_m + kDecodeWarps * kGenericHeads;

  const int row = blockIdx.x / pa.tiles_per_row;
  const int tile = blockIdx.x % pa.tiles_per_row;
  const int kv_head = tile / a.head_tiles;
  const int head0 = kv_head * a.group + (tile % a.head_tiles) * kGenericHeads;
  const int heads = min(kGenericHeads, kv_head * a.group + a.group - head0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // The row's position: sequence b's n rows are its last n tokens. Rows outside their
  // sequence's range or before its first token (bad offsets) read no key.
  const int b = sequence_of_row(pa, row);
  const int first_row = pa.query_start_loc[b];
  const int n = pa.query_start_loc[b + 1] - first_row;
  const int len = a.kv.seq_len(b, kv_head);
  const int j = row - first_row;
  const int pos = (j >= 0 && j < n) ? len - n + j : -1;
  const int begin = a.window_left >= 0 ? max(0, pos - a.window_left) : 0;
  const int end = pos >= 0 ? pos + 1 : 0;

  const T* q = static_cast<const T*>(a.query) + std::int64_t(row) * a.q_stride_batch;
  for (int i = threadIdx.x; i < kGenericHeads * D; i += kDecodeThreads) {
    const int r = i / D, d = i - r * D;
    q_smem[i] = r < heads ? to_float(q[(head0 + r) * a.q_stride_head + d]) : 0.0f;
  }
  for (int i = threadIdx.x; i < kDecodeWarps * kGenericHeads * D; i += kDecodeThreads)
    acc[i] = 0.0f;
  __syncthreads();

  const T* k_head = a.kv.k_head<T>(kv_head);
  const T* v_head = a.kv.v_head<T>(kv_head);
  const std::int32_t* table = a.kv.table_row(b, kv_head);
  float* my_acc = acc + warp * kGenericHeads * D;
  float m[kGenericHeads], l[kGenericHeads];
#pragma unroll
  for (int g = 0; g < kGenericHeads; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  constexpr int kPerLane = kGenericMaxDim / 32;
  for (int token = begin + warp; token < end; token += kDecodeWarps) {
    const int page = a.kv.page_of(token);
    const std::int64_t block = table[page];
    if (!a.kv.in_cache(block)) continue;  // never read outside the cache
    const T* k = a.kv.k_row(k_head, block, token, page);
    const T* v = a.kv.v_row(v_head, block, token, page);
    float kr[kPerLane], vr[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      kr[i] = d < D ? to_float(k[d]) : 0.0f;
      vr[i] = d < D ? to_float(v[d]) : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      if (g >= heads) break;
      float partial = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) partial += q_smem[g * D + d] * kr[i];
      }
#pragma unroll
      for (int mask = 16; mask > 0; mask /= 2) {
        partial += __shfl_xor_sync(0xffffffffu, partial, mask);
      }
      float p;
      const float correction = softmax_add(m[g], l[g], a.logit(partial), p);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) my_acc[g * D + d] = my_acc[g * D + d] * correction + p * vr[i];
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      red_m[warp * kGenericHeads + g] = m[g];
      red_l[warp * kGenericHeads + g] = l[g];
    }
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, acc, kGenericHeads, D, D, heads, head0, row, 0);
}

}  // namespace tinyserve::kernels::cuda
