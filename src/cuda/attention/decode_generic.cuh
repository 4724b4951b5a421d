#pragma once

// The CUDA-core decode kernel: any dtype (float32 included; float8 caches dequantised in
// registers), head_dim up to kMaxAttentionHeadDim, any alignment. One CTA of 4 warps per (sequence,
// split, KV head, tile of up to 8 query heads of its group); a warp per token, each lane holding
// head_dim / 32 elements of the token's K and V rows.

#include <cmath>
#include <cstdint>

#include "core/kernels.h"
#include "cuda/attention/decode_common.cuh"
#include "cuda/attention/params.cuh"
#include "cuda/attention/state.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

constexpr int kGenericHeads = 8;                      // query heads per CTA
constexpr int kGenericMaxDim = kMaxAttentionHeadDim;  // 16 elements per lane

// Shared memory of a launch: the queries in float32, every warp's output accumulators, and the
// warps' softmax states.
inline int generic_smem_bytes(int head_dim) {
  return (kGenericHeads * head_dim * (1 + kDecodeWarps) + 2 * kDecodeWarps * kGenericHeads) * 4;
}

// T: the query and output type; KV: the caches' (T, or __nv_fp8_e4m3).
template <class T, class KV>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_generic_kernel(const __grid_constant__ DecodeArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = a.output.head_dim;
  float* q_smem = reinterpret_cast<float*>(smem);         // [kGenericHeads][D]
  float* acc = q_smem + kGenericHeads * D;                // [kDecodeWarps][kGenericHeads][D]
  float* red_m = acc + kDecodeWarps * kGenericHeads * D;  // [kDecodeWarps][kGenericHeads]
  float* red_l = red_m + kDecodeWarps * kGenericHeads;

  ptx::wait_for_previous_grid();  // launched while the previous kernel drains (sm_90)
  const WorkUnit u = work_unit(a, kGenericHeads, 1, blockIdx.z);
  const int b = u.b, split = u.split, kv_head = u.kv_head, head0 = u.head0, heads = u.heads;
  const int begin = u.begin, end = u.end;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(a.query) + b * a.q_stride_batch;
  for (int i = threadIdx.x; i < kGenericHeads * D; i += kDecodeThreads) {
    const int r = i / D, d = i - r * D;
    q_smem[i] = r < heads ? to_float(q[(head0 + r) * a.q_stride_head + d]) : 0.0f;
  }
  for (int i = threadIdx.x; i < kDecodeWarps * kGenericHeads * D; i += kDecodeThreads)
    acc[i] = 0.0f;
  __syncthreads();

  const KV* k_head = a.kv.k_head<KV>(kv_head);
  const KV* v_head = a.kv.v_head<KV>(kv_head);
  // Scales of a float8 cache: K's on each score, V's on each value element.
  const float k_scale = a.k_scale.of(kv_head), v_scale = a.v_scale.of(kv_head);
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
    const KV* k = a.kv.k_row(k_head, block, token, page);
    const KV* v = a.kv.v_row(v_head, block, token, page);
    float kr[kPerLane], vr[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      kr[i] = d < D ? to_float(k[d]) : 0.0f;
      vr[i] = d < D ? to_float(v[d]) : 0.0f;
      if constexpr (kIsFp8<KV>) vr[i] *= v_scale;
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
      if constexpr (kIsFp8<KV>) partial *= k_scale;
      float p;
      const float correction = softmax_add(m[g], l[g], a.logit(partial), p);
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) my_acc[g * D + d] = my_acc[g * D + d] * correction + p * vr[i];
      }
    }
  }
  ptx::allow_dependent_grids();
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      red_m[warp * kGenericHeads + g] = m[g];
      red_l[warp * kGenericHeads + g] = l[g];
    }
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, acc, kGenericHeads, D, D, heads, head0, b, split);
}

}  // namespace tinyserve::kernels::cuda
