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

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

using In = nb::ndarray<nb::ro>;  // read-only access is enough (accepts read-only producers)
using Out = nb::ndarray<>;       // written to

namespace {

// A cache as the element type the caller names: NumPy has no float8 type, so a uint8 array
// holds float8_e4m3fn bits when kv_dtype is "float8_e4m3fn". Without kv_dtype the array's own
// dtype counts.
template <class... Ts>
TensorView cache_view(const nb::ndarray<Ts...>& a, const std::optional<std::string>& kv_dtype,
                      const char* op, const char* name) {
  TensorView t = to_view(a, op, name);
  if (!kv_dtype) return t;
  if (*kv_dtype != "float8_e4m3fn") {
    throw std::invalid_argument(std::string("tinyserve.") + op +
                                ": kv_dtype must be None or 'float8_e4m3fn', got '" + *kv_dtype +
                                "'");
  }
  if (t.dtype != DType::UInt8 && t.dtype != DType::Float8E4M3) {
    throw std::invalid_argument(std::string("tinyserve.") + op + ": " + name +
                                " must be uint8 or float8_e4m3fn with kv_dtype='float8_e4m3fn', "
                                "got " +
                                dtype_name(t.dtype));
  }
  t.dtype = DType::Float8E4M3;
  return t;
}

KVScale kv_scale(const char* op, const char* name, float value, const std::optional<In>& per_head) {
  KVScale s;
  s.value = value;
  if (per_head) s.per_head = to_view(*per_head, op, name);
  return s;
}

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

}  // namespace

void bind_ops(nb::module_& m) {
  m.def(
      "reshape_and_cache",
      [](In key, In value, Out key_cache, Out value_cache, In slot_mapping, float k_scale,
         std::optional<In> k_scale_per_head, float v_scale, std::optional<In> v_scale_per_head,
         std::optional<std::string> kv_dtype, std::uintptr_t stream) {
        const char* op = "reshape_and_cache";
        TensorView k = to_view(key, op, "key"), v = to_view(value, op, "value");
        TensorView kc = cache_view(key_cache, kv_dtype, op, "key_cache");
        TensorView vc = cache_view(value_cache, kv_dtype, op, "value_cache");
        TensorView sm = to_view(slot_mapping, op, "slot_mapping");
        CacheWriteOptions o;
        o.k_scale = kv_scale(op, "k_scale", k_scale, k_scale_per_head);
        o.v_scale = kv_scale(op, "v_scale", v_scale, v_scale_per_head);
        nb::gil_scoped_release release;
        reshape_and_cache(k, v, kc, vc, sm, o, stream);
      },
      "key"_a, "value"_a, "key_cache"_a, "value_cache"_a, "slot_mapping"_a, "k_scale"_a = 1.0f,
      "k_scale_per_head"_a = nb::none(), "v_scale"_a = 1.0f, "v_scale_per_head"_a = nb::none(),
      "kv_dtype"_a = nb::none(), "stream"_a = 0);

  m.def(
      "paged_attention",
      [](In query, In key_cache, In value_cache, In block_table, In seq_lens, Out out,
         std::optional<float> scale, int window_left, float logits_soft_cap, std::optional<Out> lse,
         std::int64_t max_seq_len, int num_splits, std::optional<Out> workspace, float k_scale,
         std::optional<In> k_scale_per_head, float v_scale, std::optional<In> v_scale_per_head,
         std::optional<std::string> kv_dtype, std::uintptr_t stream) {
        const char* op = "paged_attention";
        TensorView q = to_view(query, op, "query");
        TensorView kc = cache_view(key_cache, kv_dtype, op, "key_cache");
        TensorView vc = cache_view(value_cache, kv_dtype, op, "value_cache");
        TensorView bt = to_view(block_table, op, "block_table");
        TensorView sl = to_view(seq_lens, op, "seq_lens");
        TensorView o = to_view(out, op, "out");
        AttentionOptions opts = attention_options(op, scale, window_left, logits_soft_cap, lse,
                                                  max_seq_len, num_splits, workspace);
        opts.k_scale = kv_scale(op, "k_scale", k_scale, k_scale_per_head);
        opts.v_scale = kv_scale(op, "v_scale", v_scale, v_scale_per_head);
        nb::gil_scoped_release release;
        paged_attention(q, kc, vc, bt, sl, o, opts, stream);
      },
      "query"_a, "key_cache"_a, "value_cache"_a, "block_table"_a, "seq_lens"_a, "out"_a,
      "scale"_a = nb::none(), "window_left"_a = -1, "logits_soft_cap"_a = 0.0f,
      "lse"_a = nb::none(), "max_seq_len"_a = -1, "num_splits"_a = 0, "workspace"_a = nb::none(),
      "k_scale"_a = 1.0f, "k_scale_per_head"_a = nb::none(), "v_scale"_a = 1.0f,
      "v_scale_per_head"_a = nb::none(), "kv_dtype"_a = nb::none(), "stream"_a = 0);

  m.def(
      "plan_paged_attention",
      [](In query, In key_cache, In block_table, int window_left, std::int64_t max_seq_len,
         int num_splits, std::optional<std::string> kv_dtype) {
        const char* op = "plan_paged_attention";
        AttentionOptions o;
        o.window_left = window_left;
        o.max_seq_len = max_seq_len;
        o.num_splits = num_splits;
        AttentionPlan plan = plan_paged_attention(to_view(query, op, "query"),
                                                  cache_view(key_cache, kv_dtype, op, "key_cache"),
                                                  to_view(block_table, op, "block_table"), o);
        return std::make_pair(plan.num_splits, plan.workspace_bytes);
      },
      "query"_a, "key_cache"_a, "block_table"_a, "window_left"_a = -1, "max_seq_len"_a = -1,
      "num_splits"_a = 0, "kv_dtype"_a = nb::none(),
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
