// Page selection ops: validation and dispatch of build_page_meta and select_pages, and the
// page_meta check that reshape_and_cache shares. Nothing is written before the last check.

#include "core/selection.h"

#include <algorithm>
#include <iterator>
#include <string>

#include "tinyserve/selection.h"

namespace tinyserve {

using detail::Backend;
using detail::OpCheck;
using detail::shape_str;

namespace detail {
namespace {

void check_summary(const OpCheck& c, PageSummary summary) {
  TS_REQUIRE(c,
             summary == PageSummary::MinMax || summary == PageSummary::MeanStd ||
                 summary == PageSummary::MinMaxDamped,
             "summary must be MinMax, MeanStd or MinMaxDamped, got ", int(summary));
}

// page_meta against the expected [num_blocks, num_kv_heads, 2, head_dim] and dtype;
// num_blocks < 0 accepts any.
kernels::PageMetaDesc check_meta_shape(const OpCheck& c, const TensorView& meta,
                                       std::int64_t num_blocks, std::int64_t num_kv_heads,
                                       std::int64_t head_dim, DType dtype, const char* dtype_of,
                                       bool written) {
  c.ndim(meta, "page_meta", 4, "[num_blocks, num_kv_heads, 2, head_dim]");
  TS_REQUIRE(c, meta.dtype == dtype || meta.dtype == DType::Float8E4M3FN,
             "page_meta must have the dtype of ", dtype_of, " (", dtype_name(dtype),
             ") or float8_e4m3fn, got ", dtype_name(meta.dtype));
  const std::int64_t expect[4] = {num_blocks < 0 ? meta.shape[0] : num_blocks, num_kv_heads, 2,
                                  head_dim};
  for (int d = 0; d < 4; ++d) {
    TS_REQUIRE(c, meta.shape[d] == expect[d], "page_meta must have the shape [", expect[0], ", ",
               expect[1], ", 2, ", expect[3], "] ([num_blocks, num_kv_heads, 2, head_dim]), got ",
               shape_str(meta));
  }
  if (written) {
    c.writable(meta, "page_meta");
  } else {
    c.last_dim_contiguous(meta, "page_meta");
  }
  return {meta.data, meta.strides[0], meta.strides[1], meta.strides[2],
          meta.dtype == DType::Float8E4M3FN};
}

void check_table_and_lens(const OpCheck& c, const TensorView& block_table,
                          const TensorView& seq_lens, std::int64_t batch) {
  c.ndim(block_table, "block_table", 2, "[batch, max_blocks]");
  c.dtype(block_table, "block_table", DType::Int32);
  c.last_dim_contiguous(block_table, "block_table");
  c.dim(block_table, "block_table", 0, batch, "batch");
  c.ndim(seq_lens, "seq_lens", 1, "[batch]");
  c.dtype(seq_lens, "seq_lens", DType::Int32);
  c.last_dim_contiguous(seq_lens, "seq_lens");
  c.dim(seq_lens, "seq_lens", 0, batch, "batch");
  TS_REQUIRE(c, block_table.shape[1] <= (1 << 24), "max_blocks must be at most 16777216, got ",
             block_table.shape[1]);
  // The CUDA grids put the batch in their second dimension; the limit holds on every backend.
  TS_REQUIRE(c, batch <= 65535, "batch must be at most 65535, got ", batch);
}

// Host-side ids: every length within the table, every page it covers a block id.
void check_host_table(const OpCheck& c, const TensorView& block_table, const TensorView& seq_lens,
                      std::int64_t block_size, std::int64_t num_blocks) {
  const std::int32_t* lens = seq_lens.ptr<const std::int32_t>();
  const std::int32_t* table = block_table.ptr<const std::int32_t>();
  const std::int64_t capacity = block_table.shape[1] * block_size;
  for (std::int64_t b = 0; b < seq_lens.shape[0]; ++b) {
    const std::int32_t len = lens[b * seq_lens.strides[0]];
    TS_REQUIRE(c, len >= 0 && len <= capacity, "seq_lens[", b, "] must be in [0, ", capacity,
               "] (max_blocks * block_size), got ", len);
    for (std::int64_t page = 0; page < (len + block_size - 1) / block_size; ++page) {
      const std::int32_t id = table[b * block_table.strides[0] + page];
      TS_REQUIRE(c, id >= 0 && id < num_blocks, "block_table[", b, ", ", page,
                 "] must be a block id in [0, ", num_blocks, "), got ", id);
    }
  }
}

}  // namespace

kernels::PageMetaDesc check_page_meta(const OpCheck& c, const TensorView& page_meta,
                                      const TensorView& key_cache, PageSummary summary,
                                      bool written, DType keys) {
  check_summary(c, summary);
  // A mean and deviation extended from float8 values lose the page's earlier keys (the mean is
  // rounded to 3 bits before the next key moves it); bounds extend exactly.
  TS_REQUIRE(c, page_meta.dtype != DType::Float8E4M3FN || summary != PageSummary::MeanStd,
             "float8_e4m3fn page summaries take the min/max summaries (minmax, minmax_damped), got "
             "meanstd");
  const bool fp8_cache = key_cache.dtype == DType::Float8E4M3FN;
  return check_meta_shape(c, page_meta, key_cache.shape[0], key_cache.shape[2], key_cache.shape[3],
                          keys, fp8_cache ? "the keys written" : "the key cache", written);
}

}  // namespace detail

void build_page_meta(const TensorView& key_cache, const TensorView& block_table,
                     const TensorView& seq_lens, const TensorView& page_meta, PageSummary summary,
                     Stream stream) {
  build_page_meta(key_cache, block_table, seq_lens, page_meta, KVScale{}, summary, stream);
}

void build_page_meta(const TensorView& key_cache, const TensorView& block_table,
                     const TensorView& seq_lens, const TensorView& page_meta,
                     const KVScale& k_scale, PageSummary summary, Stream stream) {
  OpCheck c("build_page_meta");
  c.kv_cache(key_cache, "key_cache");
  detail::check_table_and_lens(c, block_table, seq_lens, block_table.shape[0]);
  // A float8 cache's summaries are of its keys as attention reads them (stored * k_scale), in
  // float32, float16, bfloat16 (the queries' precision) or float8.
  DType keys = key_cache.dtype;
  if (key_cache.dtype == DType::Float8E4M3FN) {
    TS_REQUIRE(c,
               page_meta.dtype == DType::Float32 || page_meta.dtype == DType::Float16 ||
                   page_meta.dtype == DType::BFloat16 || page_meta.dtype == DType::Float8E4M3FN,
               "page_meta of a float8_e4m3fn key cache must be float32, float16, bfloat16 or "
               "float8_e4m3fn, got ",
               dtype_name(page_meta.dtype));
    keys = page_meta.dtype;
  }
  const kernels::ScaleArg scale = detail::check_scale(c, k_scale, "k_scale", key_cache);
  kernels::PageMetaDesc meta =
      detail::check_page_meta(c, page_meta, key_cache, summary, true, keys);
  Device device = c.same_device({{key_cache, "key_cache"},
                                 {block_table, "block_table"},
                                 {seq_lens, "seq_lens"},
                                 {page_meta, "page_meta"}});
  Backend backend = c.backend(device);
  // The summaries are written while the keys, table, lengths and scales are read.
  for (const detail::Named& in :
       {detail::Named{key_cache, "key_cache"}, detail::Named{block_table, "block_table"},
        detail::Named{seq_lens, "seq_lens"}}) {
    c.disjoint({page_meta, "page_meta"}, in);
  }
  if (k_scale.per_head) c.disjoint({page_meta, "page_meta"}, {*k_scale.per_head, "k_scale"});
  if (backend == Backend::CPU) {
    detail::check_host_table(c, block_table, seq_lens, key_cache.shape[1], key_cache.shape[0]);
  }
  if (block_table.shape[0] == 0 || block_table.shape[1] == 0) return;

  kernels::BuildPageMetaParams p;
  p.dtype = key_cache.dtype;
  p.k_scale = scale;
  p.meta_dtype = page_meta.dtype;
  p.key_cache = {key_cache.data, key_cache.strides[0], key_cache.strides[1], key_cache.strides[2]};
  p.page_meta = meta;
  p.summary = page_summary_rows(summary);  // the writers know only the kinds of rows
  p.block_table = block_table.ptr<const std::int32_t>();
  p.block_table_stride = block_table.strides[0];
  p.seq_lens = seq_lens.ptr<const std::int32_t>();
  p.batch = int(block_table.shape[0]);
  p.max_blocks = int(block_table.shape[1]);
  p.num_heads = int(key_cache.shape[2]);
  p.head_dim = int(key_cache.shape[3]);
  p.block_size = int(key_cache.shape[1]);
  p.num_blocks = key_cache.shape[0];
  p.device_index = device.index;
  if (backend == Backend::CPU) {
    kernels::cpu::build_page_meta(p);
  } else {
    kernels::cuda::build_page_meta(p, stream);
  }
}

namespace {

struct SelectShapes {
  Device device;
  Backend backend;
  kernels::PageMetaDesc meta;
};

SelectShapes check_select_shapes(const OpCheck& c, const TensorView& query,
                                 const TensorView& page_meta, const TensorView& block_table) {
  c.ndim(query, "query", 3, "[batch, num_q_heads, head_dim]");
  c.attention_dtype(query, "query");
  c.last_dim_contiguous(query, "query");
  c.ndim(page_meta, "page_meta", 4, "[num_blocks, num_kv_heads, 2, head_dim]");
  TS_REQUIRE(c, page_meta.shape[1] > 0, "page_meta's num_kv_heads must be positive, got shape ",
             shape_str(page_meta));
  TS_REQUIRE(c, query.shape[1] > 0 && query.shape[1] % page_meta.shape[1] == 0,
             "num_q_heads must be a positive multiple of num_kv_heads (", page_meta.shape[1],
             "), got ", query.shape[1]);
  TS_REQUIRE(c, query.shape[0] <= (1 << 24) && query.shape[1] <= 65535,
             "sizes must fit 32-bit indexing, got query ", shape_str(query));
  // The CUDA scoring kernel holds one sequence's queries in shared memory as float32.
  TS_REQUIRE(c, query.shape[1] * query.shape[2] <= 32768,
             "num_q_heads * head_dim must be at most 32768, got query ", shape_str(query));
  c.ndim(block_table, "block_table", 2, "[batch, max_blocks]");
  // The summaries' shape and dtype against the query (so select_pages_workspace_bytes refuses
  // what select_pages would).
  const kernels::PageMetaDesc meta = detail::check_meta_shape(
      c, page_meta, -1, page_meta.shape[1], query.shape[2], query.dtype, "query", false);
  Device device =
      c.same_device({{query, "query"}, {page_meta, "page_meta"}, {block_table, "block_table"}});
  return {device, c.backend(device), meta};
}

}  // namespace

std::size_t select_pages_workspace_bytes(const TensorView& query, const TensorView& page_meta,
                                         const TensorView& block_table) {
  OpCheck c("select_pages_workspace_bytes");
  SelectShapes s = check_select_shapes(c, query, page_meta, block_table);
  if (s.backend == Backend::CPU) return 0;
  return kernels::select_scores_bytes(int(query.shape[0]), int(page_meta.shape[1]),
                                      int(block_table.shape[1]));
}

void select_pages(const TensorView& query, const TensorView& page_meta,
                  const TensorView& block_table, const TensorView& seq_lens, int budget,
                  int block_size, const TensorView& table, const TensorView& lens,
                  const SelectPagesOptions& options, Stream stream) {
  OpCheck c("select_pages");
  SelectShapes s = check_select_shapes(c, query, page_meta, block_table);
  const std::int64_t batch = query.shape[0], kv_heads = page_meta.shape[1];
  detail::check_table_and_lens(c, block_table, seq_lens, batch);
  detail::check_summary(c, options.summary);
  TS_REQUIRE(c,
             options.group_reduce == GroupReduce::Sum || options.group_reduce == GroupReduce::Max,
             "group_reduce must be Sum or Max, got ", int(options.group_reduce));
  TS_REQUIRE(c, budget >= 1, "budget must be at least 1 page, got ", budget);
  TS_REQUIRE(c, block_size > 0 && block_size <= (1 << 20),
             "block_size must be in [1, 1048576], got ", block_size);
  TS_REQUIRE(c, options.num_sink_pages >= 0, "num_sink_pages must be >= 0, got ",
             options.num_sink_pages);
  TS_REQUIRE(c, options.num_sink_pages < budget,
             "budget must exceed num_sink_pages (the last page is always kept), got budget ",
             budget, " with num_sink_pages ", options.num_sink_pages);
  c.ndim(table, "table", 3, "[batch, num_kv_heads, budget]");
  c.dtype(table, "table", DType::Int32);
  c.writable(table, "table");
  c.dim(table, "table", 0, batch, "batch");
  c.dim(table, "table", 1, kv_heads, "num_kv_heads");
  c.dim(table, "table", 2, budget, "budget");
  c.ndim(lens, "lens", 2, "[batch, num_kv_heads]");
  c.dtype(lens, "lens", DType::Int32);
  c.writable(lens, "lens");
  c.dim(lens, "lens", 0, batch, "batch");
  c.dim(lens, "lens", 1, kv_heads, "num_kv_heads");
  c.same_device({{query, "query"}, {seq_lens, "seq_lens"}, {table, "table"}, {lens, "lens"}});
  if (options.hits) {
    const TensorView& hits = *options.hits;
    c.ndim(hits, "hits", 1, "[num_blocks]");
    c.dtype(hits, "hits", DType::Int32);
    c.writable(hits, "hits");
    c.dim(hits, "hits", 0, page_meta.shape[0], "num_blocks of page_meta");
    c.same_device({{query, "query"}, {hits, "hits"}});
  }
  const std::size_t scratch =
      s.backend == Backend::CPU
          ? 0
          : kernels::select_scores_bytes(int(batch), int(kv_heads), int(block_table.shape[1]));
  if (scratch > 0) {
    TS_REQUIRE(c, options.workspace.has_value(), "the CUDA backend needs a workspace of ", scratch,
               " bytes (see select_pages_workspace_bytes), got none");
    const TensorView& ws = *options.workspace;
    c.same_device({{query, "query"}, {ws, "workspace"}});
    const std::size_t bytes = c.workspace(ws);
    TS_REQUIRE(c, bytes >= scratch, "workspace must hold at least ", scratch, " bytes, got ",
               bytes);
  }
  // Outputs share memory with nothing else of the call: the kernels read every input while
  // they write, and the outputs apart.
  TensorView absent;  // an optional output not given: empty, so it overlaps nothing
  absent.ndim = 1;
  const detail::Named inputs[] = {{query, "query"},
                                  {page_meta, "page_meta"},
                                  {block_table, "block_table"},
                                  {seq_lens, "seq_lens"}};
  const detail::Named outputs[] = {{table, "table"},
                                   {lens, "lens"},
                                   {options.hits ? *options.hits : absent, "hits"},
                                   {scratch > 0 ? *options.workspace : absent, "workspace"}};
  for (std::size_t i = 0; i < std::size(outputs); ++i) {
    for (const detail::Named& in : inputs) c.disjoint(outputs[i], in);
    for (std::size_t j = i + 1; j < std::size(outputs); ++j) c.disjoint(outputs[i], outputs[j]);
  }
  if (s.backend == Backend::CPU) {
    detail::check_host_table(c, block_table, seq_lens, block_size, page_meta.shape[0]);
  }
  if (batch == 0) return;

  kernels::SelectPagesParams p;
  p.dtype = query.dtype;
  p.query = query.data;
  p.q_stride_batch = query.strides[0];
  p.q_stride_head = query.strides[1];
  p.page_meta = s.meta;
  p.summary = options.summary;
  p.group_reduce = options.group_reduce;
  p.block_table = block_table.ptr<const std::int32_t>();
  p.block_table_stride = block_table.strides[0];
  p.max_blocks = int(block_table.shape[1]);
  p.seq_lens = seq_lens.ptr<const std::int32_t>();
  p.out_table = table.ptr<std::int32_t>();
  p.out_table_stride_batch = table.strides[0];
  p.out_table_stride_head = table.strides[1];
  p.out_lens = lens.ptr<std::int32_t>();
  p.out_lens_stride_batch = lens.strides[0];
  p.out_lens_stride_head = lens.strides[1];
  if (options.hits) p.hits = options.hits->ptr<std::int32_t>();
  if (scratch > 0) p.scores = options.workspace->ptr<float>();
  p.batch = int(batch);
  p.num_q_heads = int(query.shape[1]);
  p.num_kv_heads = int(kv_heads);
  p.head_dim = int(query.shape[2]);
  p.block_size = block_size;
  p.num_blocks = page_meta.shape[0];
  p.budget = budget;
  p.num_sink_pages = options.num_sink_pages;
  p.device_index = s.device.index;
  if (s.backend == Backend::CPU) {
    kernels::cpu::select_pages(p);
  } else {
    kernels::cuda::select_pages(p, stream);
  }
}

}  // namespace tinyserve
