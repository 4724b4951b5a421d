#pragma once

// Paged addressing: which block holds a token, where its K and V rows are, and how long a
// sequence is, for one KV head. Every attention kernel (decode, a future prefill) reads the cache
// through these, so a table shared by all KV heads and a table per KV head are the same code.
//
// Block ids and lengths live in device memory and are never trusted: an id outside the cache
// reads nothing (the caller skips or zero-fills its row), and a length is clamped to the table's
// capacity.

#include <cstdint>

#include "core/kernels.h"

namespace tinyserve::kernels::cuda {

struct PagedKV {
  const void* k_cache;
  const void* v_cache;
  std::int64_t k_stride_block, k_stride_token, k_stride_head;
  std::int64_t v_stride_block, v_stride_token, v_stride_head;
  const std::int32_t* block_table;
  std::int64_t table_stride_batch, table_stride_head;  // head stride 0: one row for all heads
  const std::int32_t* seq_lens;
  std::int64_t lens_stride_batch, lens_stride_head;  // head stride 0: one length for all heads
  std::int64_t num_blocks;
  int max_blocks;
  int block_size;
  int block_shift;  // log2(block_size) when it is a power of two, else -1

  // The page of a token (token / block_size); the slot in it is token - page * block_size.
  __device__ __forceinline__ int page_of(int token) const {
    return block_shift >= 0 ? token >> block_shift : int(unsigned(token) / unsigned(block_size));
  }

  // The block ids of sequence b as KV head kv_head sees them.
  __device__ __forceinline__ const std::int32_t* table_row(int b, int kv_head) const {
    return block_table + b * table_stride_batch + kv_head * table_stride_head;
  }

  // The length of sequence b for KV head kv_head, clamped to [0, max_blocks * block_size].
  __device__ __forceinline__ int seq_len(int b, int kv_head) const {
    const int capacity = max_blocks * block_size;  // fits int32: checked by the core
    return min(max(seq_lens[b * lens_stride_batch + kv_head * lens_stride_head], 0), capacity);
  }

  __device__ __forceinline__ bool in_cache(std::int64_t block) const {
    return block >= 0 && block < num_blocks;
  }

  // The first element of KV head kv_head in the K (V) cache.
  template <class T>
  __device__ __forceinline__ const T* k_head(int kv_head) const {
    return static_cast<const T*>(k_cache) + kv_head * k_stride_head;
  }
  template <class T>
  __device__ __forceinline__ const T* v_head(int kv_head) const {
    return static_cast<const T*>(v_cache) + kv_head * v_stride_head;
  }

  // The K (V) row of `token` from its head's first element: the token is in page `page`, held
  // in `block` (an id in the cache).
  template <class T>
  __device__ __forceinline__ const T* k_row(const T* head, std::int64_t block, int token,
                                            int page) const {
    const std::int64_t slot = token - page * block_size;
    return head + block * k_stride_block + slot * k_stride_token;
  }
  template <class T>
  __device__ __forceinline__ const T* v_row(const T* head, std::int64_t block, int token,
                                            int page) const {
    const std::int64_t slot = token - page * block_size;
    return head + block * v_stride_block + slot * v_stride_token;
  }
};

// The paged view of a call's caches, table and lengths.
inline PagedKV make_paged_kv(const PagedAttentionParams& p) {
  PagedKV kv{};
  kv.k_cache = p.key_cache.data;
  kv.v_cache = p.value_cache.data;
  kv.k_stride_block = p.key_cache.stride_block;
  kv.k_stride_token = p.key_cache.stride_token;
  kv.k_stride_head = p.key_cache.stride_head;
  kv.v_stride_block = p.value_cache.stride_block;
  kv.v_stride_token = p.value_cache.stride_token;
  kv.v_stride_head = p.value_cache.stride_head;
  kv.block_table = p.block_table;
  kv.table_stride_batch = p.block_table_stride_batch;
  kv.table_stride_head = p.block_table_stride_head;
  kv.seq_lens = p.seq_lens;
  kv.lens_stride_batch = p.seq_lens_stride_batch;
  kv.lens_stride_head = p.seq_lens_stride_head;
  kv.num_blocks = p.num_blocks;
  kv.max_blocks = p.max_blocks;
  kv.block_size = p.block_size;
  kv.block_shift =
      (p.block_size & (p.block_size - 1)) == 0 ? __builtin_ctz(unsigned(p.block_size)) : -1;
  return kv;
}

}  // namespace tinyserve::kernels::cuda
