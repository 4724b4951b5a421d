#include "tinyserve/ops.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include <optional>
#include <vector>

#include "bindings/convert.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

using In = nb::ndarray<nb::ro>;  // read-only access is enough (accepts read-only producers)
using Out = nb::ndarray<>;       // written to

namespace {

AttentionOptions attention_options(const char* op, std::optional<float> scale, int window_left,
                                   float logits_soft_cap, std::optional<Out> lse,
                                   std::int64_t max_seq_len, int num_splits,
                                   std::optional<Out> workspace,
                                   std::optional<In> query_start_loc) {
  AttentionOptions o;
  o.scale = scale;
  o.window_left = window_left;
  o.logits_soft_cap = logits_soft_cap;
  if (lse) o.lse = to_view(*lse, op, "lse");
  o.max_seq_len = max_seq_len;
  o.num_splits = num_splits;
  if (workspace) o.workspace = to_view(*workspace, op, "workspace");
  if (query_start_loc) o.query_start_loc = to_view(*query_start_loc, op, "query_start_loc");
  return o;
}

}  // namespace

void bind_ops(nb::module_& m) {
  m.def(
      "reshape_and_cache",
      [](In key, In value, Out key_cache, Out value_cache, In slot_mapping, std::uintptr_t stream) {
        const char* op = "reshape_and_cache";
        TensorView k = to_view(key, op, "key"), v = to_view(value, op, "value");
        TensorView kc = to_view(key_cache, op, "key_cache");
        TensorView vc = to_view(value_cache, op, "value_cache");
        TensorView sm = to_view(slot_mapping, op, "slot_mapping");
        nb::gil_scoped_release release;
        reshape_and_cache(k, v, kc, vc, sm, stream);
      },
      "key"_a, "value"_a, "key_cache"_a, "value_cache"_a, "slot_mapping"_a, "stream"_a = 0);

  m.def(
      "paged_attention",
      [](In query, In key_cache, In value_cache, In block_table, In seq_lens, Out out,
         std::optional<float> scale, int window_left, float logits_soft_cap, std::optional<Out> lse,
         std::int64_t max_seq_len, int num_splits, std::optional<Out> workspace,
         std::optional<In> query_start_loc, std::uintptr_t stream) {
        const char* op = "paged_attention";
        TensorView q = to_view(query, op, "query");
        TensorView kc = to_view(key_cache, op, "key_cache");
        TensorView vc = to_view(value_cache, op, "value_cache");
        TensorView bt = to_view(block_table, op, "block_table");
        TensorView sl = to_view(seq_lens, op, "seq_lens");
        TensorView o = to_view(out, op, "out");
        AttentionOptions opts =
            attention_options(op, scale, window_left, logits_soft_cap, lse, max_seq_len, num_splits,
                              workspace, query_start_loc);
        nb::gil_scoped_release release;
        paged_attention(q, kc, vc, bt, sl, o, opts, stream);
      },
      "query"_a, "key_cache"_a, "value_cache"_a, "block_table"_a, "seq_lens"_a, "out"_a,
      "scale"_a = nb::none(), "window_left"_a = -1, "logits_soft_cap"_a = 0.0f,
      "lse"_a = nb::none(), "max_seq_len"_a = -1, "num_splits"_a = 0, "workspace"_a = nb::none(),
      "query_start_loc"_a = nb::none(), "stream"_a = 0);

  m.def(
      "plan_paged_attention",
      [](In query, In key_cache, In block_table, int window_left, std::int64_t max_seq_len,
         int num_splits, std::optional<In> query_start_loc) {
        const char* op = "plan_paged_attention";
        AttentionOptions o;
        o.window_left = window_left;
        o.max_seq_len = max_seq_len;
        o.num_splits = num_splits;
        if (query_start_loc) o.query_start_loc = to_view(*query_start_loc, op, "query_start_loc");
        AttentionPlan plan =
            plan_paged_attention(to_view(query, op, "query"), to_view(key_cache, op, "key_cache"),
                                 to_view(block_table, op, "block_table"), o);
        return std::make_pair(plan.num_splits, plan.workspace_bytes);
      },
      "query"_a, "key_cache"_a, "block_table"_a, "window_left"_a = -1, "max_seq_len"_a = -1,
      "num_splits"_a = 0, "query_start_loc"_a = nb::none(),
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
  m.def("num_threads", &num_threads,
        "Worker threads of the CPU backend: as many as asked for, or fewer when the system could "
        "not start that many.");
  m.def("set_num_threads", &set_num_threads, "n"_a,
        "Sets the CPU backend's worker threads, n in [1, 1024].");
}

}  // namespace tinyserve::bindings
