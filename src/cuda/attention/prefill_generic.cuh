#pragma once

// The CUDA-core prefill kernel: any dtype (float32 included; float8 caches dequantised in
// registers), head_dim up to kMaxAttentionHeadDim, any alignment. The schedule is the tensor-core
// kernel's (see prefill_common.cuh) with 16 query rows per CTA (positions x query heads of a
// group), 4 per warp. Key tiles of 16 rows are converted to float32 in shared memory; for each of
// its rows a warp scores the 16 keys (lane l takes key l % 16 over half the dimensions), updates
// the row's online softmax, and accumulates P V with each lane holding head_dim / 32 output
// elements. A float8 cache's scales apply as in decode: K's to each score, V's to each value
// element (as it is staged).

#include <cmath>
#include <cstdint>

#include "core/kernels.h"
#include "cuda/attention/decode_generic.cuh"
#include "cuda/attention/prefill_common.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {

constexpr int kGenericPrefillThreads = 128;
constexpr int kGenericPrefillRows = 16;  // query rows per CTA
constexpr int kGenericPrefillKeys = 16;  // keys per tile
constexpr int kGenericPrefillRowsPerWarp = kGenericPrefillRows / (kGenericPrefillThreads / 32);

// Shared memory: the rows' queries, a key tile (rows padded by one float so the 16 lanes reading
// one dimension of 16 keys hit distinct banks) and a value tile, all float32.
inline int generic_prefill_smem_bytes(int head_dim) {
  return (kGenericPrefillRows * head_dim + kGenericPrefillKeys * (head_dim + 1) +
          kGenericPrefillKeys * head_dim) *
         4;
}

// T: the query and output type; KV: the caches' (T, or __nv_fp8_e4m3).
template <class T, class KV>
__global__ void __launch_bounds__(kGenericPrefillThreads)
    prefill_generic_kernel(const __grid_constant__ PrefillArgs p) {
  extern __shared__ __align__(16) unsigned char smem[];
  PrefillUnit u;
  if (!prefill_unit(p, kGenericPrefillKeys, u)) return;
  const DecodeArgs& a = p.a;
  const int D = a.output.head_dim;
  float* q_smem = reinterpret_cast<float*>(smem);          // [rows][D]
  float* k_smem = q_smem + kGenericPrefillRows * D;        // [keys][D + 1]
  float* v_smem = k_smem + kGenericPrefillKeys * (D + 1);  // [keys][D]
  const int hc = p.heads_per_cta;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(a.query);
  for (int i = threadIdx.x; i < kGenericPrefillRows * D; i += kGenericPrefillThreads) {
    const int r = i / D, d = i - r * D;
    const int pos = r / hc, h = r - pos * hc;
    q_smem[i] = pos < u.rows && h < u.heads
                    ? to_float(q[std::int64_t(u.row0 + pos) * a.q_stride_batch +
                                 std::int64_t(u.head0 + h) * a.q_stride_head + d])
                    : 0.0f;
  }

  constexpr int R = kGenericPrefillRowsPerWarp;
  constexpr int kPerLane = kGenericMaxDim / 32;
  int qpos[R];
  bool has_row[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int row = warp * R + rr;
    const int pos = row / hc, h = row - pos * hc;
    has_row[rr] = pos < u.rows && h < u.heads;
    qpos[rr] = u.pos0 + pos;
  }
  float o[R][kPerLane];
  float m[R], l[R];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    m[rr] = -INFINITY;
    l[rr] = 0.0f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) o[rr][i] = 0.0f;
  }

  const std::int32_t* table = a.kv.table_row(u.b, u.kv_head);
  const KV* k_head = a.kv.k_head<KV>(u.kv_head);
  const KV* v_head = a.kv.v_head<KV>(u.kv_head);
  const float k_scale = kIsFp8<KV> ? a.k_scale.of(u.kv_head) : 1.0f;
  const float v_scale = kIsFp8<KV> ? a.v_scale.of(u.kv_head) : 1.0f;
  const int key_end = max(0, u.pos0 + u.rows);
  const int key = lane % 16, half = lane / 16;
  for (int tile = u.tile_begin; tile < u.tile_end; ++tile) {
    const int k0 = u.key_begin + tile * kGenericPrefillKeys;
    __syncthreads();  // the previous tile is consumed (and the queries are written)
    for (int i = threadIdx.x; i < kGenericPrefillKeys * D; i += kGenericPrefillThreads) {
      const int kr = i / D, d = i - kr * D;
      const int token = k0 + kr;
      float kv = 0.0f, vv = 0.0f;
      if (token < key_end) {
        const int page = a.kv.page_of(token);
        const std::int64_t block = table[page];
        if (a.kv.in_cache(block)) {
          kv = to_float(a.kv.k_row(k_head, block, token, page)[d]);
          vv = to_float(a.kv.v_row(v_head, block, token, page)[d]);
          if constexpr (kIsFp8<KV>) vv *= v_scale;
        }
      }
      k_smem[kr * (D + 1) + d] = kv;
      v_smem[kr * D + d] = vv;
    }
    __syncthreads();
    const int token = k0 + key;
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      if (!has_row[rr]) continue;  // uniform over the warp
      const float* qr = q_smem + (warp * R + rr) * D;
      const float* kr = k_smem + key * (D + 1);
      float dot = 0.0f;
      for (int d = half; d < D; d += 2) dot += qr[d] * kr[d];
      dot += __shfl_xor_sync(0xffffffffu, dot, 16);
      if constexpr (kIsFp8<KV>) dot *= k_scale;
      const int pos = qpos[rr];
      const bool seen =
          token < key_end && token <= pos && (a.window_left < 0 || token >= pos - a.window_left);
      const float score = seen ? a.logit(dot) : -INFINITY;
      float tile_max = score;
#pragma unroll
      for (int mask = 8; mask > 0; mask /= 2) {
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, mask));
      }
      const float m_new = fmaxf(m[rr], tile_max);
      if (m_new == -INFINITY) continue;                          // no key of the row so far
      const float correction = ptx::exp2_approx(m[rr] - m_new);  // 0 when m was -inf
      const float weight = ptx::exp2_approx(score - m_new);      // 0 for an unseen key
      float weight_sum = weight;
#pragma unroll
      for (int mask = 8; mask > 0; mask /= 2) {
        weight_sum += __shfl_xor_sync(0xffffffffu, weight_sum, mask);
      }
      l[rr] = l[rr] * correction + weight_sum;
      m[rr] = m_new;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) o[rr][i] *= correction;
#pragma unroll
      for (int k = 0; k < kGenericPrefillKeys; ++k) {
        const float wk = __shfl_sync(0xffffffffu, weight, k);
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
          const int d = lane + 32 * i;
          if (d < D) o[rr][i] += wk * v_smem[k * D + d];
        }
      }
    }
  }
  ptx::allow_dependent_grids();

#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    if (!has_row[rr]) continue;
    const int row = warp * R + rr;
    const int pos = row / hc, h = row - pos * hc;
    const float inv = l[rr] > 0.0f ? 1.0f / l[rr] : 0.0f;
    const float lse2 = l[rr] > 0.0f ? m[rr] + log2f(l[rr]) : -INFINITY;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < D) {
        store_output<T>(a.output, u.row0 + pos, int(blockIdx.z), u.head0 + h, d, o[rr][i] * inv,
                        lse2);
      }
    }
  }
}

}  // namespace tinyserve::kernels::cuda
