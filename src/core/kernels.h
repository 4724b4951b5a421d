#pragma once

// The interface between the core (validation, dispatch) and the backends. Parameters arrive
// validated: a backend checks nothing the core has checked, and never calls back up. Strides are
// in elements. The CUDA backend bounds-checks ids that live in device memory, since the core
// cannot read them without a synchronisation.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "tinyserve/selection.h"
#include "tinyserve/tensor.h"

namespace tinyserve::kernels {

// One KV cache tensor, logical shape [num_blocks, block_size, num_heads, head_dim], head_dim
// contiguous.
struct CacheDesc {
  void* data = nullptr;
  std::int64_t stride_block = 0;
  std::int64_t stride_token = 0;
  std::int64_t stride_head = 0;
  // Element offset of (block, token within the block, head)'s row.
  std::int64_t offset(std::int64_t block, std::int64_t token, std::int64_t head) const {
    return block * stride_block + token * stride_token + head * stride_head;
  }
};

// Page summaries, logical shape [num_blocks, num_kv_heads, 2, head_dim] in the keys' dtype (a
// float8 cache's: the keys written, or BuildPageMetaParams::meta_dtype) or float8 e4m3fn,
// head_dim contiguous (see PageSummary in tinyserve/selection.h for what the two rows hold).
struct PageMetaDesc {
  void* data = nullptr;  // null = no summaries
  std::int64_t stride_block = 0;
  std::int64_t stride_head = 0;
  std::int64_t stride_row = 0;
  // float8 e4m3fn summaries (8-bit, rounded outward) instead of the keys' or queries' dtype
  bool fp8 = false;
};

#if defined(__CUDACC__)
#define TINYSERVE_HOST_DEVICE __host__ __device__
#else
#define TINYSERVE_HOST_DEVICE
#endif

// The scale of a float8 cache (stored value * scale = value): per_head[kv_head] when per_head is
// set (float32 [num_heads] on the caches' device), else `value`.
struct ScaleArg {
  float value = 1.0f;
  const float* per_head = nullptr;

  // KV head h's scale (a device kernel reads per_head from device memory).
  TINYSERVE_HOST_DEVICE float of(int h) const { return per_head ? per_head[h] : value; }
};

struct ReshapeAndCacheParams {
  DType dtype = DType::Float32;        // of key and value
  DType cache_dtype = DType::Float32;  // of the caches: dtype, or Float8E4M3FN (quantised)
  ScaleArg k_scale, v_scale;           // Float8E4M3FN caches only
  const void* key = nullptr;           // [num_tokens, num_heads, head_dim]
  std::int64_t key_stride_token = 0, key_stride_head = 0;
  const void* value = nullptr;
  std::int64_t value_stride_token = 0, value_stride_head = 0;
  CacheDesc key_cache, value_cache;
  const std::int64_t* slot_mapping = nullptr;  // [num_tokens], -1 = skip
  std::int64_t num_tokens = 0;
  int num_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  std::int64_t num_blocks = 0;
  // Updated from the keys written when data is set; over a Float8E4M3FN cache from the keys as
  // stored (x / k_scale rounded to e4m3, times k_scale), in the keys' dtype or float8.
  PageMetaDesc page_meta;
  PageSummary summary = PageSummary::MinMax;  // the rows: MinMax or MeanStd
  int device_index = 0;
};

// The widest head_dim that paged attention takes on every backend (the CUDA kernel for
// head dims without a tensor-core path keeps 16 elements per lane of one warp); the core checks
// it with the other arguments.
constexpr int kMaxAttentionHeadDim = 512;
// The most sequences one paged-attention call takes (the CUDA grid's third dimension).
constexpr int kMaxAttentionBatch = 65535;

// Decode (query_start_loc null): one query row per sequence, row b = sequence b. Prefill
// (query_start_loc set): sequence b owns rows query_start_loc[b] .. query_start_loc[b + 1] - 1,
// its last tokens, causal. The *_stride_batch strides of query, out and lse step from one query
// row to the next.
struct PagedAttentionParams {
  // Element types of the query, the K/V caches and the output: the output has the query's type;
  // the caches have it too, or are Float8E4M3FN (read as stored * k_scale / v_scale).
  DType query_dtype = DType::Float32;
  DType kv_dtype = DType::Float32;
  DType out_dtype = DType::Float32;
  ScaleArg k_scale, v_scale;
  const void* query = nullptr;  // [num_query_rows, num_q_heads, head_dim]
  std::int64_t q_stride_batch = 0, q_stride_head = 0;
  const std::int32_t* query_start_loc = nullptr;  // optional [batch + 1], cumulative rows
  std::int64_t num_query_rows = 0;                // batch in decode
  CacheDesc key_cache, value_cache;
  // Pages of sequence b for KV head h: block_table[b * block_table_stride_batch +
  // h * block_table_stride_head + page], and its length seq_lens[b * seq_lens_stride_batch +
  // h * seq_lens_stride_head]. A head stride of 0 shares one row (one length) among all KV heads
  // of a sequence (block_table [batch, max_blocks], seq_lens [batch]); per-KV-head tables are
  // [batch, num_kv_heads, max_blocks] with seq_lens [batch, num_kv_heads]. Both backends honour
  // both head strides.
  const std::int32_t* block_table = nullptr;
  std::int64_t block_table_stride_batch = 0;
  std::int64_t block_table_stride_head = 0;
  int max_blocks = 0;
  const std::int32_t* seq_lens = nullptr;
  std::int64_t seq_lens_stride_batch = 1;
  std::int64_t seq_lens_stride_head = 0;
  void* out = nullptr;  // [num_query_rows, num_q_heads, head_dim]
  std::int64_t out_stride_batch = 0, out_stride_head = 0;
  float* lse = nullptr;  // optional [num_query_rows, num_q_heads]
  std::int64_t lse_stride_batch = 0, lse_stride_head = 0;
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  std::int64_t num_blocks = 0;
  float scale = 1.0f;
  float logits_soft_cap = 0.0f;  // 0 = off
  int window_left = -1;          // -1 = off
  std::int64_t max_seq_len = 0;  // host-known bound, a hint for planning only
  int num_splits = 1;            // resolved, >= 1
  void* workspace = nullptr;     // CUDA: split partials
  std::size_t workspace_bytes = 0;
  int device_index = 0;
};

// One tensor of a block copy: dimension 0 indexes blocks; a block is the sub-tensor below it.
struct BlockTensor {
  void* data = nullptr;
  std::int64_t num_blocks = 0;
  std::int64_t stride_block = 0;  // elements
  int elem_size = 0;              // bytes
  int inner_ndim = 0;
  std::int64_t inner_shape[kMaxDims - 1] = {};
  std::int64_t inner_strides[kMaxDims - 1] = {};
  std::int64_t inner_numel = 0;
  // The block's elements fill a contiguous run of inner_numel elements starting at the block's
  // base (in some order): a byte copy of the run copies the block.
  bool dense = false;
};

// Block ids of a copy, int32 or int64 [num_pairs], in the memory of the backend that runs it.
struct BlockIds {
  const void* data = nullptr;
  bool wide = false;  // int64 rather than int32
  // Host memory only.
  std::int64_t operator[](std::int64_t i) const {
    return wide ? static_cast<const std::int64_t*>(data)[i]
                : static_cast<const std::int32_t*>(data)[i];
  }
};

struct CopyBlocksParams {
  std::vector<BlockTensor> tensors;
  BlockIds src, dst;
  std::int64_t num_pairs = 0;
  int device_index = 0;
};

struct SwapBlocksParams {
  BlockTensor src_cache, dst_cache;  // same inner layout, both dense
  Device src_device, dst_device;
  BlockIds src, dst;  // host memory
  std::int64_t num_pairs = 0;
};

// Workspace for split partials: per split, batch and query head, head_dim float32 outputs
// (rounded up to 256 bytes), then one float32 log-sum-exp each. The one definition of the layout:
// the core sizes the workspace with it, the CUDA backend finds the log-sum-exps with it.
inline std::size_t attention_partials_bytes(int num_splits, int batch, int num_q_heads,
                                            int head_dim) {
  const std::size_t rows = std::size_t(num_splits) * batch * num_q_heads;
  return (rows * head_dim * sizeof(float) + 255) / 256 * 256;
}

inline std::size_t attention_workspace_bytes(int num_splits, int batch, int num_q_heads,
                                             int head_dim) {
  return attention_partials_bytes(num_splits, batch, num_q_heads, head_dim) +
         std::size_t(num_splits) * batch * num_q_heads * sizeof(float);
}

// Page selection for decode (select_pages): scores every page of each (sequence, KV head)
// against the group's query heads and writes the chosen physical pages in logical order.
struct SelectPagesParams {
  DType dtype = DType::Float32;  // of query and page_meta
  const void* query = nullptr;   // [batch, num_q_heads, head_dim]
  std::int64_t q_stride_batch = 0, q_stride_head = 0;
  PageMetaDesc page_meta;
  PageSummary summary = PageSummary::MinMax;
  GroupReduce group_reduce = GroupReduce::Sum;
  const std::int32_t* block_table = nullptr;  // [batch, max_blocks]
  std::int64_t block_table_stride = 0;
  int max_blocks = 0;
  const std::int32_t* seq_lens = nullptr;  // [batch], contiguous
  std::int32_t* out_table = nullptr;       // [batch, num_kv_heads, budget]
  std::int64_t out_table_stride_batch = 0, out_table_stride_head = 0;
  std::int32_t* out_lens = nullptr;  // [batch, num_kv_heads]
  std::int64_t out_lens_stride_batch = 0, out_lens_stride_head = 0;
  std::int32_t* hits = nullptr;  // optional [num_blocks], contiguous
  float* scores = nullptr;       // CUDA scratch: float32 [batch, num_kv_heads, max_blocks]
  int batch = 0;
  int num_q_heads = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  std::int64_t num_blocks = 0;
  int budget = 0;  // pages, >= num_sink_pages + 1
  int num_sink_pages = 0;
  int device_index = 0;
};

// Summaries of pages already in the cache (build_page_meta): for each sequence, every page of
// its first seq_lens[b] tokens, from its keys.
struct BuildPageMetaParams {
  DType dtype = DType::Float32;  // of the key cache: float32/16, bfloat16 or Float8E4M3FN
  ScaleArg k_scale;              // Float8E4M3FN caches only (keys read as stored * k_scale)
  CacheDesc key_cache;
  // The summaries' dtype where they are not float8 (page_meta.fp8): the cache's, or for a float8
  // cache float32, float16 or bfloat16.
  DType meta_dtype = DType::Float32;
  PageMetaDesc page_meta;
  PageSummary summary = PageSummary::MinMax;  // the rows: MinMax or MeanStd
  const std::int32_t* block_table = nullptr;  // [batch, max_blocks]
  std::int64_t block_table_stride = 0;
  const std::int32_t* seq_lens = nullptr;  // [batch], contiguous
  int batch = 0;
  int max_blocks = 0;
  int num_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  std::int64_t num_blocks = 0;
  int device_index = 0;
};

// Bytes of CUDA scratch select_pages needs (the page scores), 0 on the CPU.
inline std::size_t select_scores_bytes(int batch, int num_kv_heads, int max_blocks) {
  return std::size_t(batch) * num_kv_heads * max_blocks * sizeof(float);
}

namespace cpu {
void reshape_and_cache(const ReshapeAndCacheParams& p);
void select_pages(const SelectPagesParams& p);
void build_page_meta(const BuildPageMetaParams& p);
void paged_attention(const PagedAttentionParams& p);
// Splits per task for a batch of num_query_rows query rows (decode: one per sequence; prefill:
// rows of several sequences, worked on in tiles of rows).
int plan_attention_splits(std::int64_t num_query_rows, bool prefill, int num_kv_heads,
                          std::int64_t max_kv_len);
void copy_blocks(const CopyBlocksParams& p);
void swap_blocks(const SwapBlocksParams& p);
}  // namespace cpu

namespace cuda {
bool compiled();
int device_count();
void reshape_and_cache(const ReshapeAndCacheParams& p, Stream stream);
void select_pages(const SelectPagesParams& p, Stream stream);
void build_page_meta(const BuildPageMetaParams& p, Stream stream);
void paged_attention(const PagedAttentionParams& p, Stream stream);
// lens: the key range of each (sequence) or (sequence, KV head), as the caller knows it on the
// host (clamped like seq_lens), lens_per_head entries per sequence (1 or num_kv_heads); empty when
// only max_kv_len is known.
int plan_attention_splits(int device_index, DType dtype, DType kv_dtype, int batch, int num_q_heads,
                          int num_kv_heads, int head_dim, std::int64_t max_kv_len,
                          const std::vector<std::int64_t>& lens, int lens_per_head);
// The split count of a prefill call (query_start_loc): num_query_rows rows over batch sequences.
int plan_prefill_splits(int device_index, DType dtype, DType kv_dtype, int batch,
                        std::int64_t num_query_rows, int num_q_heads, int num_kv_heads,
                        int head_dim, std::int64_t max_kv_len);
void copy_blocks(const CopyBlocksParams& p, Stream stream);
void swap_blocks(const SwapBlocksParams& p, Stream stream);
void synchronize(Stream stream);
}  // namespace cuda

}  // namespace tinyserve::kernels
