#include "tinyserve/ops.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/convert.h"
#include "tinyserve/selection.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

using In = nb::ndarray<nb::ro>;  // read-only access is enough (accepts read-only producers)
using Out = nb::ndarray<>;       // written to

namespace {

AttentionOptions attention_options(const char* op, std::optional<float> scale, int window_left,
                                   float logits_soft_cap, std::optional<Out> lse,
                                   std::int64_t max_seq_len, int num_splits,
                                   std::optional<Out> workspace) {
  AttentionOptions o;
  o.scale = scale;
  o.window_left = window_left;
  o.logits_soft_cap = logits_soft_cap;
  if (lse) o.lse = to_view(*lse, op, "lse");
  o.max_seq_len = max_seq_len;
  o.num_splits = num_splits;
  if (workspace) o.workspace = to_view(*workspace, op, "workspace");
  return o;
}

PageSummary page_summary(const char* op, const std::string& name) {
  if (name == "minmax") return PageSummary::MinMax;
  if (name == "meanstd") return PageSummary::MeanStd;
  throw std::invalid_argument(std::string("tinyserve.") + op +
                              ": summary must be 'minmax' or 'meanstd', got '" + name + "'");
}

GroupReduce group_reduce(const char* op, const std::string& name) {
  if (name == "sum") return GroupReduce::Sum;
  if (name == "max") return GroupReduce::Max;
  throw std::invalid_argument(std::string("tinyserve.") + op +
                              ": group_reduce must be 'sum' or 'max', got '" + name + "'");
}

}  // namespace

void bind_ops(nb::module_& m) {
  m.def(
      "reshape_and_cache",
      [](In key, In value, Out key_cache, Out value_cache, In slot_mapping,
         std::optional<Out> page_meta, const std::string& summary, std::uintptr_t stream) {
        const char* op = "reshape_and_cache";
        TensorView k = to_view(key, op, "key"), v = to_view(value, op, "value");
        TensorView kc = to_view(key_cache, op, "key_cache");
        TensorView vc = to_view(value_cache, op, "value_cache");
        TensorView sm = to_view(slot_mapping, op, "slot_mapping");
        PageSummary kind = page_summary(op, summary);
        if (page_meta) {
          TensorView meta = to_view(*page_meta, op, "page_meta");
          nb::gil_scoped_release release;
          reshape_and_cache(k, v, kc, vc, sm, meta, kind, stream);
        } else {
          nb::gil_scoped_release release;
          reshape_and_cache(k, v, kc, vc, sm, stream);
        }
      },
      "key"_a, "value"_a, "key_cache"_a, "value_cache"_a, "slot_mapping"_a,
      "page_meta"_a = nb::none(), "summary"_a = "meanstd", "stream"_a = 0);

  m.def(
      "build_page_meta",
      [](In key_cache, In block_table, In seq_lens, Out page_meta, const std::string& summary,
         std::uintptr_t stream) {
        const char* op = "build_page_meta";
        TensorView kc = to_view(key_cache, op, "key_cache");
        TensorView bt = to_view(block_table, op, "block_table");
        TensorView sl = to_view(seq_lens, op, "seq_lens");
        TensorView meta = to_view(page_meta, op, "page_meta");
        PageSummary kind = page_summary(op, summary);
        nb::gil_scoped_release release;
        build_page_meta(kc, bt, sl, meta, kind, stream);
      },
      "key_cache"_a, "block_table"_a, "seq_lens"_a, "page_meta"_a, "summary"_a = "meanstd",
      "stream"_a = 0);

  m.def(
      "select_pages",
      [](In query, In page_meta, In block_table, In seq_lens, int budget, int block_size, Out table,
         Out lens, int num_sink_pages, const std::string& summary, const std::string& reduce,
         std::optional<Out> hits, std::optional<Out> workspace, std::uintptr_t stream) {
        const char* op = "select_pages";
        TensorView q = to_view(query, op, "query");
        TensorView meta = to_view(page_meta, op, "page_meta");
        TensorView bt = to_view(block_table, op, "block_table");
        TensorView sl = to_view(seq_lens, op, "seq_lens");
        TensorView t = to_view(table, op, "table");
        TensorView l = to_view(lens, op, "lens");
        SelectPagesOptions o;
        o.summary = page_summary(op, summary);
        o.group_reduce = group_reduce(op, reduce);
        o.num_sink_pages = num_sink_pages;
        if (hits) o.hits = to_view(*hits, op, "hits");
        if (workspace) o.workspace = to_view(*workspace, op, "workspace");
        nb::gil_scoped_release release;
        select_pages(q, meta, bt, sl, budget, block_size, t, l, o, stream);
      },
      "query"_a, "page_meta"_a, "block_table"_a, "seq_lens"_a, "budget"_a, "block_size"_a,
      "table"_a, "lens"_a, "num_sink_pages"_a = 0, "summary"_a = "meanstd",
      "group_reduce"_a = "sum", "hits"_a = nb::none(), "workspace"_a = nb::none(), "stream"_a = 0);

  m.def(
      "select_pages_workspace_bytes",
      [](In query, In page_meta, In block_table) {
        const char* op = "select_pages_workspace_bytes";
        return select_pages_workspace_bytes(to_view(query, op, "query"),
                                            to_view(page_meta, op, "page_meta"),
                                            to_view(block_table, op, "block_table"));
      },
      "query"_a, "page_meta"_a, "block_table"_a,
      "Bytes of CUDA scratch select_pages needs for these shapes (0 for host arrays).");

  m.def(
      "paged_attention",
      [](In query, In key_cache, In value_cache, In block_table, In seq_lens, Out out,
         std::optional<float> scale, int window_left, float logits_soft_cap, std::optional<Out> lse,
         std::int64_t max_seq_len, int num_splits, std::optional<Out> workspace,
         std::uintptr_t stream) {
        const char* op = "paged_attention";
        TensorView q = to_view(query, op, "query");
        TensorView kc = to_view(key_cache, op, "key_cache");
        TensorView vc = to_view(value_cache, op, "value_cache");
        TensorView bt = to_view(block_table, op, "block_table");
        TensorView sl = to_view(seq_lens, op, "seq_lens");
        TensorView o = to_view(out, op, "out");
        AttentionOptions opts = attention_options(op, scale, window_left, logits_soft_cap, lse,
                                                  max_seq_len, num_splits, workspace);
        nb::gil_scoped_release release;
        paged_attention(q, kc, vc, bt, sl, o, opts, stream);
      },
      "query"_a, "key_cache"_a, "value_cache"_a, "block_table"_a, "seq_lens"_a, "out"_a,
      "scale"_a = nb::none(), "window_left"_a = -1, "logits_soft_cap"_a = 0.0f,
      "lse"_a = nb::none(), "max_seq_len"_a = -1, "num_splits"_a = 0, "workspace"_a = nb::none(),
      "stream"_a = 0);

  m.def(
      "plan_paged_attention",
      [](In query, In key_cache, In block_table, int window_left, std::int64_t max_seq_len,
         int num_splits) {
        const char* op = "plan_paged_attention";
        AttentionOptions o;
        o.window_left = window_left;
        o.max_seq_len = max_seq_len;
        o.num_splits = num_splits;
        AttentionPlan plan =
            plan_paged_attention(to_view(query, op, "query"), to_view(key_cache, op, "key_cache"),
                                 to_view(block_table, op, "block_table"), o);
        return std::make_pair(plan.num_splits, plan.workspace_bytes);
      },
      "query"_a, "key_cache"_a, "block_table"_a, "window_left"_a = -1, "max_seq_len"_a = -1,
      "num_splits"_a = 0,
      "Returns (num_splits, workspace_bytes) that paged_attention uses for these arguments.");

  m.def(
      "copy_blocks",
      [](std::vector<Out> caches, In src, In dst, std::uintptr_t stream) {
        const char* op = "copy_blocks";
        std::vector<TensorView> views;
        views.reserve(caches.size());
        for (const Out& c : caches) views.push_back(to_view(c, op, "caches[i]"));
        TensorView s = to_view(src, op, "src"), d = to_view(dst, op, "dst");
        nb::gil_scoped_release release;
        copy_blocks(views, s, d, stream);
      },
      "caches"_a, "src"_a, "dst"_a, "stream"_a = 0);

  m.def(
      "swap_blocks",
      [](In src_cache, Out dst_cache, In src, In dst, std::uintptr_t stream) {
        const char* op = "swap_blocks";
        TensorView sc = to_view(src_cache, op, "src_cache");
        TensorView dc = to_view(dst_cache, op, "dst_cache");
        TensorView s = to_view(src, op, "src"), d = to_view(dst, op, "dst");
        nb::gil_scoped_release release;
        swap_blocks(sc, dc, s, d, stream);
      },
      "src_cache"_a, "dst_cache"_a, "src"_a, "dst"_a, "stream"_a = 0);

  m.def(
      "_stream_synchronize",
      [](std::uintptr_t stream) {
        nb::gil_scoped_release release;
        cuda_stream_synchronize(stream);
      },
      "stream"_a, "Waits for the CUDA stream (used where a framework shares no stream).");

  m.def("cuda_compiled", &cuda_compiled, "True when the library was built with CUDA kernels.");
  m.def("cuda_device_count", &cuda_device_count,
        "CUDA devices visible to tinyserve (0 without CUDA, driver or device).");
  m.def("num_threads", &num_threads, "Worker threads of the CPU backend.");
  m.def("set_num_threads", &set_num_threads, "n"_a, "Sets the CPU backend's worker threads.");
}

}  // namespace tinyserve::bindings
