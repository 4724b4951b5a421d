// Op entry points: validate every argument, then dispatch to the backend of the tensors' device.
// Nothing is written before the last check has passed.

#include "tinyserve/ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "core/kernels.h"
#include "core/selection.h"
#include "core/validate.h"

namespace tinyserve {

using detail::Backend;
using detail::OpCheck;
using detail::shape_str;

namespace detail {

// The kernels' view of a float8 cache's scale `s` (named `name`), checked: a positive finite
// value, or a float32 [num_kv_heads] tensor on the caches' device whose entries, where they live
// on the host, are positive and finite. Caches of other dtypes take the default scale only.
kernels::ScaleArg check_scale(const OpCheck& c, const KVScale& s, const char* name,
                              const TensorView& cache) {
  TS_REQUIRE(c, std::isfinite(s.value) && s.value > 0.0f, name,
             " must be positive and finite, got ", s.value);
  TS_REQUIRE(c, cache.dtype == DType::Float8E4M3FN || (s.value == 1.0f && !s.per_head), name,
             " applies to float8_e4m3fn caches only, got a ", dtype_name(cache.dtype), " cache");
  kernels::ScaleArg arg;
  arg.value = s.value;
  if (s.per_head) {
    const TensorView& t = *s.per_head;
    c.ndim(t, name, 1, "[num_kv_heads]");
    c.dtype(t, name, DType::Float32);
    c.dim(t, name, 0, cache.shape[2], "num_kv_heads of the caches");
    c.last_dim_contiguous(t, name);
    c.same_device({{cache, "the caches"}, {t, name}});
    if (detail::is_host(t.device)) {
      const float* v = t.ptr<const float>();
      for (std::int64_t i = 0; i < t.shape[0]; ++i) {
        TS_REQUIRE(c, std::isfinite(v[i]) && v[i] > 0.0f, name, "[", i,
                   "] must be positive and finite, got ", v[i]);
      }
    }
    arg.per_head = t.ptr<const float>();
  }
  return arg;
}

}  // namespace detail

namespace {

constexpr int kMaxSplits = 4096;

struct AttentionShapes {
  int batch, num_q_heads, num_kv_heads, head_dim, block_size, max_blocks;
  std::int64_t num_query_rows;  // batch in decode
  bool prefill;                 // options.query_start_loc given
  Device device;
  Backend backend;
};

// Each backend's kernels behind one signature per op: the one place where an op meets a backend.
struct BackendKernels {
  void (*reshape_and_cache)(const kernels::ReshapeAndCacheParams&, Stream);
  void (*paged_attention)(const kernels::PagedAttentionParams&, Stream);
  // Splits of the key range when the caller asks for none (num_splits 0).
  // lens: the key ranges the caller knows on the host (one per sequence, or per sequence and KV
  // head: lens_per_head), empty when only max_kv_len is known.
  int (*plan_attention_splits)(const AttentionShapes&, DType dtype, DType kv_dtype,
                               std::int64_t max_kv_len, const std::vector<std::int64_t>& lens,
                               int lens_per_head);
  void (*copy_blocks)(const kernels::CopyBlocksParams&, Stream);
  void (*swap_blocks)(const kernels::SwapBlocksParams&, Stream);
  bool split_partials_in_workspace;  // split attention needs the caller's workspace
};

constexpr BackendKernels kCpuKernels{
    [](const kernels::ReshapeAndCacheParams& p, Stream) { kernels::cpu::reshape_and_cache(p); },
    [](const kernels::PagedAttentionParams& p, Stream) { kernels::cpu::paged_attention(p); },
    [](const AttentionShapes& s, DType, DType, std::int64_t max_kv_len,
       const std::vector<std::int64_t>&, int) {
      return kernels::cpu::plan_attention_splits(s.num_query_rows, s.prefill, s.num_kv_heads,
                                                 max_kv_len);
    },
    [](const kernels::CopyBlocksParams& p, Stream) { kernels::cpu::copy_blocks(p); },
    [](const kernels::SwapBlocksParams& p, Stream) { kernels::cpu::swap_blocks(p); },
    false,
};

constexpr BackendKernels kCudaKernels{
    kernels::cuda::reshape_and_cache,
    kernels::cuda::paged_attention,
    [](const AttentionShapes& s, DType dtype, DType kv_dtype, std::int64_t max_kv_len,
       const std::vector<std::int64_t>& lens, int lens_per_head) {
      if (s.prefill) {
        return kernels::cuda::plan_prefill_splits(s.device.index, dtype, kv_dtype, s.batch,
                                                  s.num_query_rows, s.num_q_heads, s.num_kv_heads,
                                                  s.head_dim, max_kv_len);
      }
      return kernels::cuda::plan_attention_splits(s.device.index, dtype, kv_dtype, s.batch,
                                                  s.num_q_heads, s.num_kv_heads, s.head_dim,
                                                  max_kv_len, lens, lens_per_head);
    },
    kernels::cuda::copy_blocks,
    kernels::cuda::swap_blocks,
    true,
};

const BackendKernels& kernels_of(Backend backend) {
  return backend == Backend::CPU ? kCpuKernels : kCudaKernels;
}

kernels::CacheDesc cache_desc(const TensorView& t) {
  return {t.data, t.strides[0], t.strides[1], t.strides[2]};
}

void check_cache_pair(const OpCheck& c, const TensorView& key_cache,
                      const TensorView& value_cache) {
  c.kv_cache(key_cache, "key_cache");
  c.kv_cache(value_cache, "value_cache");
  c.same_dtype(key_cache, "key_cache", value_cache, "value_cache");
  for (int d = 0; d < 4; ++d) {
    if (key_cache.shape[d] != value_cache.shape[d]) {
      c.fail("value_cache must have the shape of key_cache ", shape_str(key_cache), ", got ",
             shape_str(value_cache));
    }
  }
}

// The longest key range one query reads: the table's capacity, cut by the caller's bound and
// the sliding window.
std::int64_t max_kv_len(const AttentionOptions& o, std::int64_t capacity) {
  std::int64_t len = capacity;
  if (o.max_seq_len >= 0) len = std::min(len, o.max_seq_len);
  if (o.window_left >= 0) len = std::min<std::int64_t>(len, std::int64_t(o.window_left) + 1);
  return len;
}

// Checks what planning needs (query, caches, block table, options) and returns the shapes.
AttentionShapes check_attention_plan_args(const OpCheck& c, const TensorView& query,
                                          const TensorView& key_cache,
                                          const TensorView& block_table,
                                          const AttentionOptions& o) {
  const bool prefill = o.query_start_loc.has_value();
  c.ndim(query, "query", 3,
         prefill ? "[total_rows, num_q_heads, head_dim]" : "[batch, num_q_heads, head_dim]");
  c.attention_dtype(query, "query");
  c.last_dim_contiguous(query, "query");
  c.kv_cache(key_cache, "key_cache");
  c.ndim(block_table, "block_table", block_table.ndim == 3 ? 3 : 2,
         "[batch, max_blocks] or [batch, num_kv_heads, max_blocks]");
  c.dtype(block_table, "block_table", DType::Int32);
  c.last_dim_contiguous(block_table, "block_table");
  c.dim(query, "query", 2, key_cache.shape[3], "head_dim of the caches");
  const int table_dim = block_table.ndim - 1;  // its max_blocks dimension
  if (block_table.ndim == 3) {
    // One page list per KV head: what select_pages writes, for decode.
    c.dim(block_table, "block_table", 1, key_cache.shape[2], "num_kv_heads of the caches");
    TS_REQUIRE(c, !prefill,
               "a per-KV-head block_table is for decode: query_start_loc must be None, got one");
    TS_REQUIRE(c, o.window_left == -1,
               "a per-KV-head block_table holds selected pages, not positions: window_left must "
               "be -1, got ",
               o.window_left);
  }
  if (prefill) {
    const TensorView& qsl = *o.query_start_loc;
    c.ndim(qsl, "query_start_loc", 1, "[batch + 1]");
    c.dtype(qsl, "query_start_loc", DType::Int32);
    c.last_dim_contiguous(qsl, "query_start_loc");
    c.dim(qsl, "query_start_loc", 0, block_table.shape[0] + 1, "batch + 1 of block_table");
    TS_REQUIRE(c, query.shape[0] <= INT32_MAX, "query must have at most ", INT32_MAX,
               " rows (query_start_loc is int32), got ", query.shape[0]);
  } else {
    c.dim(block_table, "block_table", 0, query.shape[0], "batch");
  }
  if (query.shape[1] % key_cache.shape[2] != 0 || query.shape[1] == 0) {
    c.fail("num_q_heads must be a positive multiple of num_kv_heads (", key_cache.shape[2],
           "), got ", query.shape[1]);
  }
  TS_REQUIRE(c, o.window_left >= -1, "window_left must be -1 (off) or >= 0, got ", o.window_left);
  TS_REQUIRE(c, o.num_splits >= 0 && o.num_splits <= kMaxSplits, "num_splits must be in [0, ",
             kMaxSplits, "], got ", o.num_splits);
  TS_REQUIRE(c, o.max_seq_len >= -1, "max_seq_len must be -1 (unknown) or >= 0, got ",
             o.max_seq_len);
  if (o.host_seq_lens) {
    const TensorView& hl = *o.host_seq_lens;
    TS_REQUIRE(c, detail::is_host(hl.device), "host_seq_lens must be in host memory, got ",
               detail::device_str(hl.device));
    c.dtype(hl, "host_seq_lens", DType::Int32);
    TS_REQUIRE(
        c, hl.ndim == 1 || (hl.ndim == 2 && block_table.ndim == 3), "host_seq_lens must be [batch]",
        block_table.ndim == 3 ? " or [batch, num_kv_heads]" : "", ", got shape ", shape_str(hl));
    c.dim(hl, "host_seq_lens", 0, block_table.shape[0], "batch");
    if (hl.ndim == 2) c.dim(hl, "host_seq_lens", 1, key_cache.shape[2], "num_kv_heads");
    TS_REQUIRE(c, hl.data != nullptr || hl.numel() == 0,
               "host_seq_lens has no data, got a null pointer");
  }
  TS_REQUIRE(c, std::isfinite(o.logits_soft_cap) && o.logits_soft_cap >= 0.0f,
             "logits_soft_cap must be finite and >= 0 (0 = off), got ", o.logits_soft_cap);
  if (o.scale) {
    TS_REQUIRE(c, std::isfinite(*o.scale) && *o.scale != 0.0f,
               "scale must be finite and nonzero, got ", *o.scale);
  }
  // (The batch has a tighter limit below.)
  TS_REQUIRE(c, block_table.shape[table_dim] <= (1 << 30) && query.shape[1] <= 65535,
             "sizes must fit 32-bit indexing, got query ", shape_str(query), " and block_table ",
             shape_str(block_table));
  // Limits of the CUDA kernels, checked on every backend so that a call means the same
  // everywhere.
  TS_REQUIRE(c, key_cache.shape[3] <= kernels::kMaxAttentionHeadDim, "head_dim must be at most ",
             kernels::kMaxAttentionHeadDim, ", got ", key_cache.shape[3]);
  TS_REQUIRE(c, block_table.shape[0] <= kernels::kMaxAttentionBatch, "batch must be at most ",
             kernels::kMaxAttentionBatch, ", got ", block_table.shape[0]);
  TS_REQUIRE(c, query.shape[0] * query.shape[1] <= INT32_MAX,
             prefill ? "total_rows * num_q_heads" : "batch * num_q_heads", " must be at most ",
             INT32_MAX, ", got ", prefill ? "total_rows " : "batch ", query.shape[0],
             " and num_q_heads ", query.shape[1]);
  TS_REQUIRE(c, block_table.shape[table_dim] <= INT32_MAX / key_cache.shape[1],
             "max_blocks * block_size must be at most ", INT32_MAX, ", got max_blocks ",
             block_table.shape[table_dim], " and block_size ", key_cache.shape[1]);
  Device device =
      c.same_device({{query, "query"}, {key_cache, "key_cache"}, {block_table, "block_table"}});
  if (prefill) c.same_device({{query, "query"}, {*o.query_start_loc, "query_start_loc"}});
  Backend backend = c.backend(device);
  return {int(block_table.shape[0]),
          int(query.shape[1]),
          int(key_cache.shape[2]),
          int(key_cache.shape[3]),
          int(key_cache.shape[1]),
          int(block_table.shape[table_dim]),
          query.shape[0],
          prefill,
          device,
          backend};
}

AttentionPlan make_plan(const AttentionShapes& s, DType dtype, DType kv_dtype,
                        const AttentionOptions& o) {
  AttentionPlan plan;
  std::int64_t kv_len = max_kv_len(o, std::int64_t(s.max_blocks) * s.block_size);
  const BackendKernels& k = kernels_of(s.backend);
  // The host copy of the lengths, clamped as the kernels clamp seq_lens and cut to kv_len (the
  // caller's bound and the window).
  std::vector<std::int64_t> lens;
  int lens_per_head = 1;
  if (o.host_seq_lens && o.num_splits == 0 && !s.prefill) {
    const TensorView& hl = *o.host_seq_lens;
    lens_per_head = hl.ndim == 2 ? int(hl.shape[1]) : 1;
    lens.reserve(std::size_t(hl.numel()));
    const auto* base = static_cast<const std::int32_t*>(hl.data);
    for (std::int64_t b = 0; b < hl.shape[0]; ++b) {
      for (int h = 0; h < lens_per_head; ++h) {
        const std::int64_t at = b * hl.strides[0] + (hl.ndim == 2 ? h * hl.strides[1] : 0);
        lens.push_back(std::clamp<std::int64_t>(base[at], 0, kv_len));
      }
    }
  }
  plan.num_splits = o.num_splits > 0
                        ? o.num_splits
                        : k.plan_attention_splits(s, dtype, kv_dtype, kv_len, lens, lens_per_head);
  if (k.split_partials_in_workspace && plan.num_splits > 1) {
    plan.workspace_bytes = kernels::attention_workspace_bytes(
        plan.num_splits, int(s.num_query_rows), s.num_q_heads, s.head_dim);
  }
  return plan;
}

kernels::BlockTensor block_tensor(const OpCheck& c, const TensorView& t, const char* name) {
  TS_REQUIRE(c, t.ndim >= 1, name, " must have at least 1 dimension [num_blocks, ...], got ",
             t.ndim, " (shape ", shape_str(t), ")");
  for (int i = 0; i < t.ndim; ++i) {
    TS_REQUIRE(c, t.shape[i] >= 0, name, " has a negative extent, got shape ", shape_str(t));
  }
  TS_REQUIRE(c, t.data != nullptr || t.numel() == 0, name, " has no data, got a null pointer");
  // A tensor of one value per block ([num_blocks]) may have any block stride.
  if (t.ndim > 1) {
    c.writable(t, name);
  } else {
    c.distinct_elements(t, name);
  }
  kernels::BlockTensor b;
  b.data = t.data;
  b.num_blocks = t.shape[0];
  b.stride_block = t.strides[0];
  b.elem_size = int(dtype_size(t.dtype));
  b.inner_ndim = t.ndim - 1;
  b.inner_numel = 1;
  for (int i = 1; i < t.ndim; ++i) {
    b.inner_shape[i - 1] = t.shape[i];
    b.inner_strides[i - 1] = t.strides[i];
    b.inner_numel *= t.shape[i];
  }
  // Dense: sorted by stride, each extent-above-1 dimension's stride is the product of the
  // extents below it. (On the stack: this runs for every tensor of every copy.)
  std::pair<std::int64_t, std::int64_t> dims[kMaxDims - 1];  // (stride, extent)
  int num_dims = 0;
  for (int i = 0; i < b.inner_ndim; ++i) {
    if (b.inner_shape[i] > 1) dims[num_dims++] = {b.inner_strides[i], b.inner_shape[i]};
  }
  std::sort(dims, dims + num_dims);
  std::int64_t expect = 1;
  b.dense = true;
  for (int i = 0; i < num_dims; ++i) {
    if (dims[i].first != expect) b.dense = false;
    expect *= dims[i].second;
  }
  return b;
}

// Ids of a block copy, on the host: in range, no destination twice, and (when source and
// destination are one tensor) no block both read and written.
void check_host_block_ids(const OpCheck& c, kernels::BlockIds src, kernels::BlockIds dst,
                          std::int64_t n, std::int64_t src_blocks, std::int64_t dst_blocks,
                          bool same_tensor) {
  for (std::int64_t i = 0; i < n; ++i) {
    TS_REQUIRE(c, src[i] >= 0 && src[i] < src_blocks, "src[", i, "] must be a block id in [0, ",
               src_blocks, "), got ", src[i]);
    TS_REQUIRE(c, dst[i] >= 0 && dst[i] < dst_blocks, "dst[", i, "] must be a block id in [0, ",
               dst_blocks, "), got ", dst[i]);
  }
  // Repeated destinations (and, within one tensor, blocks both read and written): a bitmap of
  // the destination blocks where it is small next to the ids (one pass, no sort: a 2,048-pair
  // swap's host time is otherwise mostly the sort), else the sorted ids.
  const std::int64_t words = (dst_blocks + 63) / 64;
  if (words <= 16 * n + 65536) {
    std::vector<std::uint64_t> written(static_cast<std::size_t>(words), 0);
    for (std::int64_t i = 0; i < n; ++i) {
      const std::int64_t id = dst[i];
      std::uint64_t& word = written[std::size_t(id >> 6)];
      const std::uint64_t bit = std::uint64_t(1) << (id & 63);
      TS_REQUIRE(c, (word & bit) == 0, "dst must not name a block twice, got ", id, " twice");
      word |= bit;
    }
    if (same_tensor) {
      for (std::int64_t i = 0; i < n; ++i) {
        const std::int64_t id = src[i];
        const bool both = id < dst_blocks && (written[std::size_t(id >> 6)] >> (id & 63)) & 1;
        TS_REQUIRE(c, !both, "a block must not be both a source and a destination, got block ", id);
      }
    }
    return;
  }
  std::vector<std::int64_t> sorted_dst(static_cast<std::size_t>(n));
  for (std::int64_t i = 0; i < n; ++i) sorted_dst[std::size_t(i)] = dst[i];
  std::sort(sorted_dst.begin(), sorted_dst.end());
  auto dup = std::adjacent_find(sorted_dst.begin(), sorted_dst.end());
  TS_REQUIRE(c, dup == sorted_dst.end(), "dst must not name a block twice, got ",
             dup == sorted_dst.end() ? 0 : *dup, " twice");
  if (same_tensor) {
    for (std::int64_t i = 0; i < n; ++i) {
      TS_REQUIRE(c, !std::binary_search(sorted_dst.begin(), sorted_dst.end(), src[i]),
                 "a block must not be both a source and a destination, got block ", src[i]);
    }
  }
}

// src and dst of a block copy: int32 or int64 [num_pairs], one dtype, as many of each.
void check_id_arrays(const OpCheck& c, const TensorView& src, const TensorView& dst) {
  for (const detail::Named& n : {detail::Named{src, "src"}, detail::Named{dst, "dst"}}) {
    c.ndim(n.t, n.name, 1, "[num_pairs]");
    TS_REQUIRE(c, n.t.dtype == DType::Int32 || n.t.dtype == DType::Int64, n.name,
               " must be int32 or int64, got ", dtype_name(n.t.dtype));
    c.last_dim_contiguous(n.t, n.name);
  }
  c.same_dtype(src, "src", dst, "dst");
  c.dim(dst, "dst", 0, src.shape[0], "num_pairs of src");
}

kernels::BlockIds block_ids(const TensorView& t) { return {t.data, t.dtype == DType::Int64}; }

bool same_view(const TensorView& a, const TensorView& b) {
  if (a.data != b.data || a.dtype != b.dtype || a.ndim != b.ndim) return false;
  for (int d = 0; d < a.ndim; ++d) {
    if (a.shape[d] != b.shape[d] || a.strides[d] != b.strides[d]) return false;
  }
  return true;
}

// No two tensors of one copy share memory: a block written through one would be read or
// written through another in the same launch. Only tensors whose address ranges meet are
// compared closely.
void check_disjoint_tensors(const OpCheck& c, const std::vector<TensorView>& tensors) {
  struct Range {
    std::uintptr_t lo, hi;
    std::size_t index;
  };
  // On the stack for the usual few tensors (this runs on every call).
  constexpr std::size_t kInline = 16;
  Range inline_ranges[kInline];
  std::vector<Range> more;
  Range* ranges = inline_ranges;
  if (tensors.size() > kInline) {
    more.resize(tensors.size());
    ranges = more.data();
  }
  std::size_t count = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    if (tensors[i].numel() == 0) continue;
    auto [lo, hi] = detail::byte_range(tensors[i]);
    ranges[count++] = {lo, hi, i};
  }
  std::sort(ranges, ranges + count, [](const Range& a, const Range& b) {
    return a.lo != b.lo ? a.lo < b.lo : a.index < b.index;
  });
  for (std::size_t a = 0; a < count; ++a) {
    for (std::size_t b = a + 1; b < count && ranges[b].lo < ranges[a].hi; ++b) {
      std::size_t i = std::min(ranges[a].index, ranges[b].index);
      std::size_t j = std::max(ranges[a].index, ranges[b].index);
      c.disjoint({tensors[i], detail::IndexedName("caches", i).text},
                 {tensors[j], detail::IndexedName("caches", j).text});
    }
  }
}

}  // namespace

namespace {

void write_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                 const TensorView& value_cache, const TensorView& slot_mapping,
                 const CacheWriteOptions& options, const TensorView* page_meta, PageSummary summary,
                 Stream stream) {
  OpCheck c("reshape_and_cache");
  c.ndim(key, "key", 3, "[num_tokens, num_kv_heads, head_dim]");
  c.ndim(value, "value", 3, "[num_tokens, num_kv_heads, head_dim]");
  check_cache_pair(c, key_cache, value_cache);
  c.ndim(slot_mapping, "slot_mapping", 1, "[num_tokens]");
  c.dtype(slot_mapping, "slot_mapping", DType::Int64);
  c.last_dim_contiguous(slot_mapping, "slot_mapping");
  if (key_cache.dtype == DType::Float8E4M3FN) {
    c.attention_dtype(key, "key");
  } else {
    c.same_dtype(key_cache, "key_cache", key, "key");
  }
  c.same_dtype(key, "key", value, "value");
  c.last_dim_contiguous(key, "key");
  c.last_dim_contiguous(value, "value");
  c.dim(key, "key", 1, key_cache.shape[2], "num_kv_heads of the caches");
  c.dim(key, "key", 2, key_cache.shape[3], "head_dim of the caches");
  for (int d = 0; d < 3; ++d) {
    if (value.shape[d] != key.shape[d]) {
      c.fail("value must have the shape of key ", shape_str(key), ", got ", shape_str(value));
    }
  }
  c.dim(slot_mapping, "slot_mapping", 0, key.shape[0], "num_tokens of key");
  Device device = c.same_device({{key, "key"},
                                 {value, "value"},
                                 {key_cache, "key_cache"},
                                 {value_cache, "value_cache"},
                                 {slot_mapping, "slot_mapping"}});
  Backend backend = c.backend(device);
  c.disjoint({key_cache, "key_cache"}, {value_cache, "value_cache"});
  for (const detail::Named& cache :
       {detail::Named{key_cache, "key_cache"}, detail::Named{value_cache, "value_cache"}}) {
    c.disjoint(cache, {key, "key"});
    c.disjoint(cache, {value, "value"});
    c.disjoint(cache, {slot_mapping, "slot_mapping"});
  }
  const kernels::ScaleArg k_scale = detail::check_scale(c, options.k_scale, "k_scale", key_cache);
  const kernels::ScaleArg v_scale = detail::check_scale(c, options.v_scale, "v_scale", value_cache);
  // Per-head scales are read while the caches are written.
  for (const KVScale* scale : {&options.k_scale, &options.v_scale}) {
    if (!scale->per_head) continue;
    const detail::Named named{*scale->per_head, scale == &options.k_scale ? "k_scale" : "v_scale"};
    c.disjoint({key_cache, "key_cache"}, named);
    c.disjoint({value_cache, "value_cache"}, named);
  }
  kernels::PageMetaDesc meta;
  if (page_meta) {
    meta = detail::check_page_meta(c, *page_meta, key_cache, summary, true, key.dtype);
    c.same_device({{key_cache, "key_cache"}, {*page_meta, "page_meta"}});
    for (const detail::Named& other :
         {detail::Named{key_cache, "key_cache"}, detail::Named{value_cache, "value_cache"},
          detail::Named{key, "key"}, detail::Named{value, "value"},
          detail::Named{slot_mapping, "slot_mapping"}}) {
      c.disjoint({*page_meta, "page_meta"}, other);
    }
    // A float8 cache's summaries are written while its scales are read.
    for (const KVScale* scale : {&options.k_scale, &options.v_scale}) {
      if (!scale->per_head) continue;
      c.disjoint({*page_meta, "page_meta"},
                 {*scale->per_head, scale == &options.k_scale ? "k_scale" : "v_scale"});
    }
  }

  const std::int64_t num_slots = key_cache.shape[0] * key_cache.shape[1];
  if (detail::is_host(device)) {  // slots in host memory: check every one
    const std::int64_t* slots = slot_mapping.ptr<const std::int64_t>();
    for (std::int64_t i = 0; i < slot_mapping.shape[0]; ++i) {
      TS_REQUIRE(c, slots[i] >= -1 && slots[i] < num_slots, "slot_mapping[", i,
                 "] must be -1 or a slot in [0, ", num_slots, "), got ", slots[i]);
    }
  }
  if (key.shape[0] == 0) return;

  kernels::ReshapeAndCacheParams p;
  p.dtype = key.dtype;
  p.cache_dtype = key_cache.dtype;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.key = key.data;
  p.key_stride_token = key.strides[0];
  p.key_stride_head = key.strides[1];
  p.value = value.data;
  p.value_stride_token = value.strides[0];
  p.value_stride_head = value.strides[1];
  p.key_cache = cache_desc(key_cache);
  p.value_cache = cache_desc(value_cache);
  p.slot_mapping = slot_mapping.ptr<const std::int64_t>();
  p.num_tokens = key.shape[0];
  p.num_heads = int(key.shape[1]);
  p.head_dim = int(key.shape[2]);
  p.block_size = int(key_cache.shape[1]);
  p.num_blocks = key_cache.shape[0];
  p.page_meta = meta;
  p.summary = page_summary_rows(summary);  // the writers know only the kinds of rows
  p.device_index = device.index;
  kernels_of(backend).reshape_and_cache(p, stream);
}

}  // namespace

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping,
                       Stream stream) {
  write_cache(key, value, key_cache, value_cache, slot_mapping, CacheWriteOptions{}, nullptr,
              PageSummary::MinMax, stream);
}

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping,
                       const CacheWriteOptions& options, Stream stream) {
  write_cache(key, value, key_cache, value_cache, slot_mapping, options, nullptr,
              PageSummary::MinMax, stream);
}

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping,
                       const TensorView& page_meta, PageSummary summary, Stream stream) {
  write_cache(key, value, key_cache, value_cache, slot_mapping, CacheWriteOptions{}, &page_meta,
              summary, stream);
}

void reshape_and_cache(const TensorView& key, const TensorView& value, const TensorView& key_cache,
                       const TensorView& value_cache, const TensorView& slot_mapping,
                       const CacheWriteOptions& options, const TensorView& page_meta,
                       PageSummary summary, Stream stream) {
  write_cache(key, value, key_cache, value_cache, slot_mapping, options, &page_meta, summary,
              stream);
}

AttentionPlan plan_paged_attention(const TensorView& query, const TensorView& key_cache,
                                   const TensorView& block_table, const AttentionOptions& options) {
  OpCheck c("plan_paged_attention");
  AttentionShapes s = check_attention_plan_args(c, query, key_cache, block_table, options);
  return make_plan(s, query.dtype, key_cache.dtype, options);
}

void paged_attention(const TensorView& query, const TensorView& key_cache,
                     const TensorView& value_cache, const TensorView& block_table,
                     const TensorView& seq_lens, const TensorView& out,
                     const AttentionOptions& options, Stream stream) {
  OpCheck c("paged_attention");
  check_cache_pair(c, key_cache, value_cache);
  AttentionShapes s = check_attention_plan_args(c, query, key_cache, block_table, options);
  if (key_cache.dtype != DType::Float8E4M3FN) c.same_dtype(key_cache, "key_cache", query, "query");
  const kernels::ScaleArg k_scale = detail::check_scale(c, options.k_scale, "k_scale", key_cache);
  const kernels::ScaleArg v_scale = detail::check_scale(c, options.v_scale, "v_scale", value_cache);
  const bool per_head = block_table.ndim == 3;
  if (per_head) {
    c.ndim(seq_lens, "seq_lens", 2, "[batch, num_kv_heads] (the block_table is per KV head)");
    c.dim(seq_lens, "seq_lens", 1, s.num_kv_heads, "num_kv_heads");
  } else {
    c.ndim(seq_lens, "seq_lens", 1, "[batch]");
  }
  c.dtype(seq_lens, "seq_lens", DType::Int32);
  c.last_dim_contiguous(seq_lens, "seq_lens");
  c.dim(seq_lens, "seq_lens", 0, s.batch, "batch");
  c.ndim(out, "out", 3,
         s.prefill ? "[total_rows, num_q_heads, head_dim]" : "[batch, num_q_heads, head_dim]");
  c.same_dtype(query, "query", out, "out");
  c.writable(out, "out");
  for (int d = 0; d < 3; ++d) {
    if (out.shape[d] != query.shape[d]) {
      c.fail("out must have the shape of query ", shape_str(query), ", got ", shape_str(out));
    }
  }
  c.same_device(
      {{query, "query"}, {value_cache, "value_cache"}, {seq_lens, "seq_lens"}, {out, "out"}});
  if (options.lse) {
    const TensorView& lse = *options.lse;
    c.ndim(lse, "lse", 2, s.prefill ? "[total_rows, num_q_heads]" : "[batch, num_q_heads]");
    c.dtype(lse, "lse", DType::Float32);
    c.writable(lse, "lse");
    c.dim(lse, "lse", 0, s.num_query_rows, s.prefill ? "total_rows" : "batch");
    c.dim(lse, "lse", 1, s.num_q_heads, "num_q_heads");
    c.same_device({{query, "query"}, {lse, "lse"}});
  }
  // Outputs share memory with nothing else of the call (query_start_loc and per-head scales
  // included: the kernels read them while rows of out are being written). An optional input
  // not given stands as a tensor of no element ([0]: a default view has no dimension, which
  // counts as one element), so it overlaps nothing.
  TensorView absent;
  absent.ndim = 1;
  const detail::Named all_inputs[] = {
      {query, "query"},
      {key_cache, "key_cache"},
      {value_cache, "value_cache"},
      {block_table, "block_table"},
      {seq_lens, "seq_lens"},
      {s.prefill ? *options.query_start_loc : absent, "query_start_loc"},
      {options.k_scale.per_head ? *options.k_scale.per_head : absent, "k_scale"},
      {options.v_scale.per_head ? *options.v_scale.per_head : absent, "v_scale"}};
  const auto apart_from_inputs = [&](const detail::Named& output) {
    for (const detail::Named& in : all_inputs) c.disjoint(output, in);
  };
  apart_from_inputs({out, "out"});
  if (options.lse) {
    apart_from_inputs({*options.lse, "lse"});
    c.disjoint({*options.lse, "lse"}, {out, "out"});
  }
  AttentionPlan plan = make_plan(s, query.dtype, key_cache.dtype, options);
  if (plan.workspace_bytes > 0) {
    TS_REQUIRE(c, options.workspace.has_value(), "splitting into ", plan.num_splits,
               " pieces needs a workspace of ", plan.workspace_bytes,
               " bytes (see plan_paged_attention), got none");
    const TensorView& ws = *options.workspace;
    c.same_device({{query, "query"}, {ws, "workspace"}});
    const std::size_t bytes = c.workspace(ws);
    TS_REQUIRE(c, bytes >= plan.workspace_bytes, "workspace must hold at least ",
               plan.workspace_bytes, " bytes for ", plan.num_splits, " splits, got ", bytes);
    apart_from_inputs({ws, "workspace"});
    c.disjoint({ws, "workspace"}, {out, "out"});
    if (options.lse) c.disjoint({ws, "workspace"}, {*options.lse, "lse"});
  }

  const std::int64_t capacity = std::int64_t(s.max_blocks) * s.block_size;
  const std::int32_t* starts =
      s.prefill ? options.query_start_loc->ptr<const std::int32_t>() : nullptr;
  if (detail::is_host(s.device)) {
    // Ids and lengths live on the host: check every one the kernel will read.
    const std::int32_t* lens = seq_lens.ptr<const std::int32_t>();
    const std::int32_t* table = block_table.ptr<const std::int32_t>();
    if (s.prefill) {
      TS_REQUIRE(c, starts[0] == 0, "query_start_loc[0] must be 0, got ", starts[0]);
      TS_REQUIRE(c, starts[s.batch] == s.num_query_rows, "query_start_loc[", s.batch,
                 "] (the last entry) must be the number of query rows ", s.num_query_rows, ", got ",
                 starts[s.batch]);
    }
    // Per-KV-head tables (decode only): every head's length and pages.
    for (int b = 0; per_head && b < s.batch; ++b) {
      for (int h = 0; h < s.num_kv_heads; ++h) {
        const std::int32_t len = lens[b * seq_lens.strides[0] + h * seq_lens.strides[1]];
        TS_REQUIRE(c, len >= 0 && len <= capacity, "seq_lens[", b, ", ", h, "] must be in [0, ",
                   capacity, "] (max_blocks * block_size), got ", len);
        const std::int32_t* row = table + b * block_table.strides[0] + h * block_table.strides[1];
        for (std::int64_t page = 0; page < (len + s.block_size - 1) / s.block_size; ++page) {
          TS_REQUIRE(c, row[page] >= 0 && row[page] < key_cache.shape[0], "block_table[", b, ", ",
                     h, ", ", page, "] must be a block id in [0, ", key_cache.shape[0], "), got ",
                     row[page]);
        }
      }
    }
    for (int b = 0; !per_head && b < s.batch; ++b) {
      TS_REQUIRE(c, lens[b] >= 0 && lens[b] <= capacity, "seq_lens[", b, "] must be in [0, ",
                 capacity, "] (max_blocks * block_size), got ", lens[b]);
      // The first query row's position: the oldest key any row of the sequence reads.
      std::int64_t first_row = lens[b] - 1;
      if (s.prefill) {
        TS_REQUIRE(c, starts[b + 1] >= starts[b], "query_start_loc must be non-decreasing, got ",
                   starts[b], " then ", starts[b + 1], " at index ", b);
        const std::int64_t rows = std::int64_t(starts[b + 1]) - starts[b];
        TS_REQUIRE(c, rows <= lens[b], "sequence ", b, " must have at most seq_lens[b] = ", lens[b],
                   " query rows (its last tokens), got ", rows, " (query_start_loc[", b + 1,
                   "] - query_start_loc[", b, "])");
        if (rows == 0) continue;
        first_row = lens[b] - rows;
      }
      std::int64_t first = 0;
      if (options.window_left >= 0)
        first = std::max<std::int64_t>(0, first_row - options.window_left);
      for (std::int64_t page = first / s.block_size;
           page < (lens[b] + s.block_size - 1) / s.block_size; ++page) {
        std::int32_t id = table[b * block_table.strides[0] + page];
        TS_REQUIRE(c, id >= 0 && id < key_cache.shape[0], "block_table[", b, ", ", page,
                   "] must be a block id in [0, ", key_cache.shape[0], "), got ", id);
      }
    }
  }
  if (s.batch == 0 || s.num_query_rows == 0) return;

  kernels::PagedAttentionParams p;
  p.query_dtype = query.dtype;
  p.kv_dtype = key_cache.dtype;
  p.out_dtype = out.dtype;
  p.k_scale = k_scale;
  p.v_scale = v_scale;
  p.query = query.data;
  p.q_stride_batch = query.strides[0];
  p.q_stride_head = query.strides[1];
  if (s.prefill) p.query_start_loc = starts;
  p.num_query_rows = s.num_query_rows;
  p.key_cache = cache_desc(key_cache);
  p.value_cache = cache_desc(value_cache);
  p.block_table = block_table.ptr<const std::int32_t>();
  p.block_table_stride_batch = block_table.strides[0];
  p.max_blocks = s.max_blocks;
  p.seq_lens = seq_lens.ptr<const std::int32_t>();
  p.seq_lens_stride_batch = seq_lens.strides[0];
  if (per_head) {
    p.block_table_stride_head = block_table.strides[1];
    p.seq_lens_stride_head = seq_lens.strides[1];
  }
  p.out = out.data;
  p.out_stride_batch = out.strides[0];
  p.out_stride_head = out.strides[1];
  if (options.lse) {
    p.lse = options.lse->ptr<float>();
    p.lse_stride_batch = options.lse->strides[0];
    p.lse_stride_head = options.lse->strides[1];
  }
  p.batch = s.batch;
  p.num_q_heads = s.num_q_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.block_size = s.block_size;
  p.num_blocks = key_cache.shape[0];
  p.scale = options.scale ? *options.scale : 1.0f / std::sqrt(float(s.head_dim));
  p.logits_soft_cap = options.logits_soft_cap;
  p.window_left = options.window_left;
  p.max_seq_len = max_kv_len(options, capacity);
  p.num_splits = plan.num_splits;
  if (plan.workspace_bytes > 0) {
    p.workspace = options.workspace->data;
    p.workspace_bytes = c.workspace(*options.workspace);
  }
  p.device_index = s.device.index;
  kernels_of(s.backend).paged_attention(p, stream);
}

void copy_blocks(const std::vector<TensorView>& caches, const TensorView& src,
                 const TensorView& dst, Stream stream) {
  OpCheck c("copy_blocks");
  check_id_arrays(c, src, dst);
  c.same_device({{src, "src"}, {dst, "dst"}});
  kernels::CopyBlocksParams p;
  p.tensors.reserve(caches.size());
  std::int64_t min_blocks = INT64_MAX;
  for (std::size_t i = 0; i < caches.size(); ++i) {
    const detail::IndexedName item("caches", i);
    const char* name = item.text;
    p.tensors.push_back(block_tensor(c, caches[i], name));
    c.same_device({{src, "src"}, {caches[i], name}});
    c.disjoint({caches[i], name}, {src, "src"});
    c.disjoint({caches[i], name}, {dst, "dst"});
    min_blocks = std::min(min_blocks, caches[i].shape[0]);
  }
  check_disjoint_tensors(c, caches);
  Backend backend = c.backend(src.device);
  if (detail::is_host(src.device) && !caches.empty()) {
    check_host_block_ids(c, block_ids(src), block_ids(dst), src.shape[0], min_blocks, min_blocks,
                         true);
  }
  if (caches.empty() || src.shape[0] == 0) return;
  p.src = block_ids(src);
  p.dst = block_ids(dst);
  p.num_pairs = src.shape[0];
  p.device_index = src.device.index;
  kernels_of(backend).copy_blocks(p, stream);
}

void swap_blocks(const TensorView& src_cache, const TensorView& dst_cache, const TensorView& src,
                 const TensorView& dst, Stream stream) {
  OpCheck c("swap_blocks");
  check_id_arrays(c, src, dst);
  TS_REQUIRE(c, detail::is_host(src.device) && detail::is_host(dst.device),
             "src and dst must be in host memory, got ", detail::device_str(src.device), " and ",
             detail::device_str(dst.device));
  kernels::SwapBlocksParams p;
  p.src_cache = block_tensor(c, src_cache, "src_cache");
  p.dst_cache = block_tensor(c, dst_cache, "dst_cache");
  c.same_dtype(src_cache, "src_cache", dst_cache, "dst_cache");
  TS_REQUIRE(c, src_cache.ndim == dst_cache.ndim, "dst_cache must have the rank of src_cache (",
             src_cache.ndim, "), got ", dst_cache.ndim);
  for (int d = 1; d < src_cache.ndim; ++d) {
    TS_REQUIRE(c, src_cache.shape[d] == dst_cache.shape[d],
               "dst_cache must match src_cache in every dimension but the first, got ",
               shape_str(src_cache), " and ", shape_str(dst_cache));
  }
  for (int d = 1; d < src_cache.ndim; ++d) {
    TS_REQUIRE(c, src_cache.shape[d] <= 1 || src_cache.strides[d] == dst_cache.strides[d],
               "src_cache and dst_cache must lay out a block alike, got stride ",
               src_cache.strides[d], " and ", dst_cache.strides[d], " in dimension ", d);
  }
  TS_REQUIRE(c, p.src_cache.dense,
             "a block of the caches must be one contiguous run of memory, "
             "got strides of shape ",
             shape_str(src_cache));
  bool src_cuda = !detail::is_host(src_cache.device);
  bool dst_cuda = !detail::is_host(dst_cache.device);
  TS_REQUIRE(c, !(src_cuda && dst_cuda) || src_cache.device.index == dst_cache.device.index,
             "device caches must be on one device, got ", detail::device_str(src_cache.device),
             " and ", detail::device_str(dst_cache.device));
  Device device = src_cuda ? src_cache.device : dst_cache.device;
  Backend backend = c.backend(device);
  // One tensor as both caches is a copy within it (the ids then keep reads and writes apart);
  // two tensors must not share memory.
  const bool same_tensor = same_view(src_cache, dst_cache);
  if (!same_tensor) c.disjoint({src_cache, "src_cache"}, {dst_cache, "dst_cache"});
  for (const detail::Named& ids : {detail::Named{src, "src"}, detail::Named{dst, "dst"}}) {
    c.disjoint({dst_cache, "dst_cache"}, ids);
  }
  check_host_block_ids(c, block_ids(src), block_ids(dst), src.shape[0], src_cache.shape[0],
                       dst_cache.shape[0], same_tensor);
  if (src.shape[0] == 0) return;
  p.src_device = src_cache.device;
  p.dst_device = dst_cache.device;
  p.src = block_ids(src);
  p.dst = block_ids(dst);
  p.num_pairs = src.shape[0];
  kernels_of(backend).swap_blocks(p, stream);
}

bool cuda_compiled() { return kernels::cuda::compiled(); }
int cuda_device_count() { return kernels::cuda::device_count(); }
void cuda_stream_synchronize(Stream stream) { kernels::cuda::synchronize(stream); }

}  // namespace tinyserve
