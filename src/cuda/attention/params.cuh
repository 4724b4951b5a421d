#pragma once

// The decode kernels' arguments, built once per call from the core's PagedAttentionParams by
// make_decode_args: the paged view of the caches, the outputs, and the values derived on the host
// (the GQA group, the logit transform). Both decode kernels and the split merge read them from
// the kernel parameter space (__grid_constant__), so nothing is copied to the device first.

#include <cstdint>

#include "core/kernels.h"
#include "cuda/attention/page.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/attention/state.cuh"

namespace tinyserve::kernels::cuda {

// The decode kernels' CTA: 4 warps.
constexpr int kDecodeThreads = 128;
constexpr int kDecodeWarps = kDecodeThreads / 32;

struct DecodeArgs {
  const void* query;  // [batch, num_q_heads, head_dim]
  std::int64_t q_stride_batch, q_stride_head;
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
  __device__ __forceinline__ float k_scale_of(int kv_head) const {
    return k_scale.per_head ? k_scale.per_head[kv_head] : k_scale.value;
  }
  __device__ __forceinline__ float v_scale_of(int kv_head) const {
    return v_scale.per_head ? v_scale.per_head[kv_head] : v_scale.value;
  }
};

// The arguments of a launch whose CTAs each take up to heads_per_cta query heads of a group.
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
