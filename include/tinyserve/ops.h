#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "tinyserve/export.h"
#include "tinyserve/tensor.h"

// The kernels' entry points. Every op validates all of its arguments before it writes anything
// (a rejected call leaves every tensor untouched), then runs on the backend that the tensors'
// device selects: host memory runs the CPU backend, CUDA memory the CUDA backend. CUDA ops are
// enqueued on `stream` and never synchronise.
//
// A KV cache tensor has the logical shape [num_blocks, block_size, num_kv_heads, head_dim] with
// a contiguous last dimension and no two elements at one address; any other strides are allowed
// (HND storage is the permuted view). A tensor that an op writes shares no memory with any other
// tensor of the call (K and V may be two views of one [num_blocks, 2, ...] tensor: their elements
// are apart).

namespace tinyserve {

// The scale of a float8_e4m3fn KV cache: a stored value s stands for s * scale, so a write stores
// x / scale (rounded to nearest even, saturated to +-448). Either one value for the whole tensor,
// or, when `per_head` is set, a float32 tensor [num_kv_heads] (one scale per KV head) on the
// caches' device; CUDA kernels read it from device memory when they run (no host read, so a
// captured CUDA graph sees the values of each replay). Scales must be positive and finite: the
// host checks a value and a host tensor's entries; a device tensor's entries are the caller's
// promise. Only float8 caches take scales other than the default 1.
struct KVScale {
  float value = 1.0f;
  std::optional<TensorView> per_head;
};

struct CacheWriteOptions {
  KVScale k_scale, v_scale;
};

// Writes new tokens' keys and values, [num_tokens, num_kv_heads, head_dim], into the cache slots
// named by slot_mapping (int64 [num_tokens], slot = block * block_size + offset, -1 = skip).
TINYSERVE_API void reshape_and_cache(const TensorView& key, const TensorView& value,
                                     const TensorView& key_cache, const TensorView& value_cache,
                                     const TensorView& slot_mapping, Stream stream = 0);

// The same into caches of another element type: float8_e4m3fn caches take float32, float16 or
// bfloat16 keys and values and store them quantised with the options' scales.
TINYSERVE_API void reshape_and_cache(const TensorView& key, const TensorView& value,
                                     const TensorView& key_cache, const TensorView& value_cache,
                                     const TensorView& slot_mapping,
                                     const CacheWriteOptions& options, Stream stream = 0);

struct AttentionOptions {
  // Softmax scale applied to q.k; unset means 1/sqrt(head_dim).
  std::optional<float> scale;
  // Sliding window: attend only to the last window_left + 1 tokens (the query's own position and
  // window_left before it). -1 attends to the whole sequence.
  int window_left = -1;
  // When > 0, logits become cap * tanh(logits / cap) before the softmax.
  float logits_soft_cap = 0.0f;
  // Optional output: the natural-log sum of exp(logits) per (sequence, query head), float32
  // [batch, num_q_heads]. An empty sequence gets -inf.
  std::optional<TensorView> lse;
  // An upper bound on seq_lens that the caller knows on the host (no device read is ever made).
  // -1 uses the block table's capacity, max_blocks * block_size.
  std::int64_t max_seq_len = -1;
  // Decode: the sequences' lengths as the caller knows them on the host (host memory, int32
  // [batch], or [batch, num_kv_heads] with a per-KV-head block_table), only to plan the split
  // count (num_splits 0) on CUDA: where they differ, the split is balanced over them. Clamped
  // like seq_lens; never read on the device, and the call still reads seq_lens.
  std::optional<TensorView> host_seq_lens;
  // How many pieces each sequence is split into (flash-decoding). 0 picks from the device and
  // the batch; 1 disables splitting. A fixed value gives batch-invariant results.
  int num_splits = 0;
  // CUDA scratch for split partials, at least plan_paged_attention(...).workspace_bytes bytes on
  // the tensors' device, contiguous and 16-byte aligned. Unused by the CPU backend and when no
  // split happens.
  std::optional<TensorView> workspace;
  // Scales of float8_e4m3fn caches (see KVScale): keys and values are read as stored * scale.
  KVScale k_scale, v_scale;
  // Prefill / append / chunked prefill: int32 [batch + 1], cumulative. Sequence b's query rows
  // are query[query_start_loc[b] : query_start_loc[b + 1]], its last tokens (their keys and
  // values already in the cache), attended causally. See paged_attention.
  std::optional<TensorView> query_start_loc;
};

struct AttentionPlan {
  int num_splits = 1;
  std::size_t workspace_bytes = 0;
};

// Attention over the paged KV cache. block_table int32 [batch, max_blocks], seq_lens int32
// [batch], out like query; for decode also per KV head, block_table int32 [batch, num_kv_heads,
// max_blocks] and seq_lens int32 [batch, num_kv_heads] (what select_pages writes; window_left
// must be -1). num_q_heads must be a multiple of num_kv_heads (GQA/MQA). Softmax in
// float32 whatever the dtype. The caches have the query's dtype, or are float8_e4m3fn
// (dequantised on the fly with options.k_scale/v_scale).
//
// Decode (no options.query_start_loc): one query token per sequence, query [batch, num_q_heads,
// head_dim], attending to the whole sequence (or its window). A sequence of length 0 gets a zero
// output and lse -inf.
//
// Prefill (options.query_start_loc, int32 [batch + 1]): query [total_rows, num_q_heads,
// head_dim]; sequence b owns rows query_start_loc[b] .. query_start_loc[b + 1] - 1, which are
// its last n_b tokens, at positions seq_lens[b] - n_b .. seq_lens[b] - 1 (their keys and values
// already written). The row at position p attends causally to keys 0..p (window_left = w: keys
// p - w .. p). query_start_loc[0] = 0, non-decreasing, last entry = total_rows, and
// n_b <= seq_lens[b]; a sequence may have no rows, and a decode step is a sequence with one. lse
// is [total_rows, num_q_heads]. The CPU backend checks the offsets before writing. On CUDA they
// stay on the device and are not checked: bad offsets give wrong rows (zeros for a row that finds
// no key) but never a read outside the cache or a write outside out.
TINYSERVE_API void paged_attention(const TensorView& query, const TensorView& key_cache,
                                   const TensorView& value_cache, const TensorView& block_table,
                                   const TensorView& seq_lens, const TensorView& out,
                                   const AttentionOptions& options = {}, Stream stream = 0);

// The split count and the workspace that paged_attention would use for these arguments; it
// depends only on host-side values (shapes, options, and the device's multiprocessor count).
TINYSERVE_API AttentionPlan plan_paged_attention(const TensorView& query,
                                                 const TensorView& key_cache,
                                                 const TensorView& block_table,
                                                 const AttentionOptions& options = {});

// Copies block src[i] to block dst[i] in every tensor of `caches` (each indexed by block along
// dimension 0: K and V caches of every layer, page metadata, one value per block ([num_blocks],
// any stride), ...; any element type, since bytes are copied), all pairs of all tensors in one
// launch on CUDA. src and dst are int32 or int64 [num_pairs] (one dtype) on the caches' device. A
// block must not be both a source and a destination of one call, no destination may repeat, and the
// tensors must not share memory.
TINYSERVE_API void copy_blocks(const std::vector<TensorView>& caches, const TensorView& src,
                               const TensorView& dst, Stream stream = 0);

// Copies block src[i] of src_cache to block dst[i] of dst_cache, where the caches may live on
// different devices (pinned host memory and a CUDA device: offload and recall). The caches share
// dtype (any) and every dimension but the first; src and dst are int32 or int64 [num_pairs] (one
// dtype) in host memory, and no destination may repeat.
TINYSERVE_API void swap_blocks(const TensorView& src_cache, const TensorView& dst_cache,
                               const TensorView& src, const TensorView& dst, Stream stream = 0);

// Backends.
TINYSERVE_API bool cuda_compiled();     // built with the CUDA backend
TINYSERVE_API int cuda_device_count();  // 0 when not compiled, no driver or no device
TINYSERVE_API void cuda_stream_synchronize(Stream stream);  // waits for a CUDA stream
// Worker threads of the CPU backend (the calling thread counts as one): the number asked for
// (set_num_threads, else TINYSERVE_NUM_THREADS, else the hardware's), or fewer when the system
// could not start that many. set_num_threads takes n in [1, 1024].
TINYSERVE_API int num_threads();
TINYSERVE_API void set_num_threads(int n);
// Whether the CPU backend converts float16 K/V with the processor's F16C instructions (x86 with
// AVX and F16C, checked at run time) rather than with the portable software conversion.
TINYSERVE_API bool cpu_hardware_float16();

}  // namespace tinyserve
