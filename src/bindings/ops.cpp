#include "tinyserve/ops.h"

#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>

#include <optional>
#include <string>
#include <vector>

#include "bindings/convert.h"
#include "tinyserve/selection.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

namespace {

PageSummary page_summary(nb::handle h, const char* op) {
  const std::string name = to_name(h, op, "summary");
  if (name == "minmax") return PageSummary::MinMax;
  if (name == "meanstd") return PageSummary::MeanStd;
  if (name == "minmax_damped") return PageSummary::MinMaxDamped;
  detail::fail(op, "summary must be 'minmax', 'minmax_damped' or 'meanstd', got '", name, "'");
}

GroupReduce group_reduce(nb::handle h, const char* op) {
  const std::string name = to_name(h, op, "group_reduce");
  if (name == "sum") return GroupReduce::Sum;
  if (name == "max") return GroupReduce::Max;
  detail::fail(op, "group_reduce must be 'sum' or 'max', got '", name, "'");
}

// A cache as the element type the caller names: NumPy has no float8 type, so a uint8 array
// holds float8_e4m3fn bits when kv_dtype is "float8_e4m3fn". With kv_dtype None the array's own
// dtype counts.
// `arg` names the option (kv_dtype, or meta_dtype for page summaries).
TensorView as_kv_dtype(TensorView t, nb::handle kv_dtype, const char* op, const char* name,
                       const char* arg = "kv_dtype") {
  if (kv_dtype.is_none()) return t;
  if (!nb::isinstance<nb::str>(kv_dtype) || nb::cast<std::string>(kv_dtype) != "float8_e4m3fn") {
    detail::fail(op, arg, " must be None or 'float8_e4m3fn', got ", nb::repr(kv_dtype).c_str());
  }
  if (t.dtype != DType::UInt8 && t.dtype != DType::Float8E4M3FN) {
    detail::fail(op, name, " must be uint8 or float8_e4m3fn with ", arg, "='float8_e4m3fn', got ",
                 dtype_name(t.dtype));
  }
  t.dtype = DType::Float8E4M3FN;
  return t;
}

// A float8 cache's scale: None (1), a number (one for the tensor) or an array (one per KV head).
KVScale kv_scale(Arrays& a, nb::handle h, const char* op, const char* name) {
  KVScale s;
  if (h.is_none()) return s;
  if (PyFloat_Check(h.ptr()) || PyLong_Check(h.ptr())) {  // a bool: to_float refuses it
    s.value = to_float(h, op, name);
  } else {
    s.per_head = a.input(h, name);
  }
  return s;
}

}  // namespace

// Every argument arrives as a Python object and goes through convert.h, so that whatever cannot
// be converted is reported with the op, the argument and the value.
void bind_ops(nb::module_& m) {
  m.def(
      "reshape_and_cache",
      [](nb::handle key, nb::handle value, nb::handle key_cache, nb::handle value_cache,
         nb::handle slot_mapping, nb::handle page_meta, nb::handle summary, nb::handle k_scale,
         nb::handle v_scale, nb::handle kv_dtype, nb::handle meta_dtype, nb::handle stream) {
        const char* op = "reshape_and_cache";
        Arrays a(op);
        TensorView k = a.input(key, "key"), v = a.input(value, "value");
        TensorView kc = as_kv_dtype(a.output(key_cache, "key_cache"), kv_dtype, op, "key_cache");
        TensorView vc =
            as_kv_dtype(a.output(value_cache, "value_cache"), kv_dtype, op, "value_cache");
        TensorView sm = a.input(slot_mapping, "slot_mapping");
        std::optional<TensorView> meta = a.optional_output(page_meta, "page_meta");
        if (meta) meta = as_kv_dtype(*meta, meta_dtype, op, "page_meta", "meta_dtype");
        PageSummary kind = page_summary(summary, op);
        CacheWriteOptions o;
        o.k_scale = kv_scale(a, k_scale, op, "k_scale");
        o.v_scale = kv_scale(a, v_scale, op, "v_scale");
        Stream s = to_int<Stream>(stream, op, "stream");
        nb::gil_scoped_release release;
        if (meta) {
          reshape_and_cache(k, v, kc, vc, sm, o, *meta, kind, s);
        } else {
          reshape_and_cache(k, v, kc, vc, sm, o, s);
        }
      },
      "key"_a.none(), "value"_a.none(), "key_cache"_a.none(), "value_cache"_a.none(),
      "slot_mapping"_a.none(), "page_meta"_a.none() = nb::none(), "summary"_a.none() = "minmax",
      "k_scale"_a.none() = nb::none(), "v_scale"_a.none() = nb::none(),
      "kv_dtype"_a.none() = nb::none(), "meta_dtype"_a.none() = nb::none(), "stream"_a.none() = 0,
      nb::sig("def reshape_and_cache(key: typing.Any, value: typing.Any, key_cache: typing.Any, "
              "value_cache: typing.Any, slot_mapping: typing.Any, page_meta: typing.Any | None = "
              "None, summary: str = 'minmax', k_scale: typing.Any | None = None, v_scale: "
              "typing.Any | None = None, kv_dtype: str | None = None, meta_dtype: str | None = "
              "None, stream: int = 0) -> None"));

  m.def(
      "build_page_meta",
      [](nb::handle key_cache, nb::handle block_table, nb::handle seq_lens, nb::handle page_meta,
         nb::handle summary, nb::handle k_scale, nb::handle kv_dtype, nb::handle meta_dtype,
         nb::handle stream) {
        const char* op = "build_page_meta";
        Arrays a(op);
        TensorView kc = as_kv_dtype(a.input(key_cache, "key_cache"), kv_dtype, op, "key_cache");
        TensorView bt = a.input(block_table, "block_table");
        TensorView sl = a.input(seq_lens, "seq_lens");
        TensorView meta = as_kv_dtype(a.output(page_meta, "page_meta"), meta_dtype, op, "page_meta",
                                      "meta_dtype");
        PageSummary kind = page_summary(summary, op);
        KVScale scale = kv_scale(a, k_scale, op, "k_scale");
        Stream s = to_int<Stream>(stream, op, "stream");
        nb::gil_scoped_release release;
        build_page_meta(kc, bt, sl, meta, scale, kind, s);
      },
      "key_cache"_a.none(), "block_table"_a.none(), "seq_lens"_a.none(), "page_meta"_a.none(),
      "summary"_a.none() = "minmax", "k_scale"_a.none() = nb::none(),
      "kv_dtype"_a.none() = nb::none(), "meta_dtype"_a.none() = nb::none(), "stream"_a.none() = 0,
      nb::sig("def build_page_meta(key_cache: typing.Any, block_table: typing.Any, seq_lens: "
              "typing.Any, page_meta: typing.Any, summary: str = 'minmax', k_scale: typing.Any | "
              "None = None, kv_dtype: str | None = None, meta_dtype: str | None = None, stream: "
              "int = 0) -> None"));

  m.def(
      "select_pages",
      [](nb::handle query, nb::handle page_meta, nb::handle block_table, nb::handle seq_lens,
         nb::handle budget, nb::handle block_size, nb::handle table, nb::handle lens,
         nb::handle num_sink_pages, nb::handle summary, nb::handle reduce, nb::handle hits,
         nb::handle workspace, nb::handle meta_dtype, nb::handle stream) {
        const char* op = "select_pages";
        Arrays a(op);
        TensorView q = a.input(query, "query");
        TensorView meta =
            as_kv_dtype(a.input(page_meta, "page_meta"), meta_dtype, op, "page_meta", "meta_dtype");
        TensorView bt = a.input(block_table, "block_table");
        TensorView sl = a.input(seq_lens, "seq_lens");
        TensorView t = a.output(table, "table");
        TensorView l = a.output(lens, "lens");
        SelectPagesOptions o;
        o.summary = page_summary(summary, op);
        o.group_reduce = group_reduce(reduce, op);
        o.num_sink_pages = to_int<int>(num_sink_pages, op, "num_sink_pages");
        o.hits = a.optional_output(hits, "hits");
        o.workspace = a.optional_output(workspace, "workspace");
        const int b = to_int<int>(budget, op, "budget");
        const int size = to_int<int>(block_size, op, "block_size");
        Stream s = to_int<Stream>(stream, op, "stream");
        nb::gil_scoped_release release;
        select_pages(q, meta, bt, sl, b, size, t, l, o, s);
      },
      "query"_a.none(), "page_meta"_a.none(), "block_table"_a.none(), "seq_lens"_a.none(),
      "budget"_a.none(), "block_size"_a.none(), "table"_a.none(), "lens"_a.none(),
      "num_sink_pages"_a.none() = 0, "summary"_a.none() = "minmax", "group_reduce"_a.none() = "sum",
      "hits"_a.none() = nb::none(), "workspace"_a.none() = nb::none(),
      "meta_dtype"_a.none() = nb::none(), "stream"_a.none() = 0,
      nb::sig("def select_pages(query: typing.Any, page_meta: typing.Any, block_table: "
              "typing.Any, seq_lens: typing.Any, budget: int, block_size: int, table: typing.Any, "
              "lens: typing.Any, num_sink_pages: int = 0, summary: str = 'minmax', "
              "group_reduce: str = 'sum', hits: typing.Any | None = None, workspace: typing.Any | "
              "None = None, meta_dtype: str | None = None, stream: int = 0) -> None"));

  m.def(
      "select_pages_workspace_bytes",
      [](nb::handle query, nb::handle page_meta, nb::handle block_table, nb::handle meta_dtype) {
        const char* op = "select_pages_workspace_bytes";
        Arrays a(op);
        TensorView q = a.input(query, "query");
        TensorView meta =
            as_kv_dtype(a.input(page_meta, "page_meta"), meta_dtype, op, "page_meta", "meta_dtype");
        return select_pages_workspace_bytes(q, meta, a.input(block_table, "block_table"));
      },
      "query"_a.none(), "page_meta"_a.none(), "block_table"_a.none(),
      "meta_dtype"_a.none() = nb::none(),
      nb::sig("def select_pages_workspace_bytes(query: typing.Any, page_meta: typing.Any, "
              "block_table: typing.Any, meta_dtype: str | None = None) -> int"),
      "Bytes of CUDA scratch select_pages needs for these shapes (0 for host arrays).");

  m.def(
      "paged_attention",
      [](nb::handle query, nb::handle key_cache, nb::handle value_cache, nb::handle block_table,
         nb::handle seq_lens, nb::handle out, nb::handle scale, nb::handle window_left,
         nb::handle logits_soft_cap, nb::handle lse, nb::handle max_seq_len, nb::handle num_splits,
         nb::handle workspace, nb::handle query_start_loc, nb::handle k_scale, nb::handle v_scale,
         nb::handle kv_dtype, nb::handle stream) {
        const char* op = "paged_attention";
        Arrays a(op);
        TensorView q = a.input(query, "query");
        TensorView kc = as_kv_dtype(a.input(key_cache, "key_cache"), kv_dtype, op, "key_cache");
        TensorView vc =
            as_kv_dtype(a.input(value_cache, "value_cache"), kv_dtype, op, "value_cache");
        TensorView bt = a.input(block_table, "block_table");
        TensorView sl = a.input(seq_lens, "seq_lens");
        TensorView o = a.output(out, "out");
        AttentionOptions opts;
        opts.scale = to_optional_float(scale, op, "scale");
        opts.window_left = to_int<int>(window_left, op, "window_left");
        opts.logits_soft_cap = to_float(logits_soft_cap, op, "logits_soft_cap");
        opts.lse = a.optional_output(lse, "lse");
        opts.max_seq_len = to_int<std::int64_t>(max_seq_len, op, "max_seq_len");
        opts.num_splits = to_int<int>(num_splits, op, "num_splits");
        opts.workspace = a.optional_output(workspace, "workspace");
        opts.query_start_loc = a.optional_input(query_start_loc, "query_start_loc");
        opts.k_scale = kv_scale(a, k_scale, op, "k_scale");
        opts.v_scale = kv_scale(a, v_scale, op, "v_scale");
        Stream s = to_int<Stream>(stream, op, "stream");
        nb::gil_scoped_release release;
        paged_attention(q, kc, vc, bt, sl, o, opts, s);
      },
      "query"_a.none(), "key_cache"_a.none(), "value_cache"_a.none(), "block_table"_a.none(),
      "seq_lens"_a.none(), "out"_a.none(), "scale"_a.none() = nb::none(),
      "window_left"_a.none() = -1, "logits_soft_cap"_a.none() = 0.0f, "lse"_a.none() = nb::none(),
      "max_seq_len"_a.none() = -1, "num_splits"_a.none() = 0, "workspace"_a.none() = nb::none(),
      "query_start_loc"_a.none() = nb::none(), "k_scale"_a.none() = nb::none(),
      "v_scale"_a.none() = nb::none(), "kv_dtype"_a.none() = nb::none(), "stream"_a.none() = 0,
      nb::sig("def paged_attention(query: typing.Any, key_cache: typing.Any, value_cache: "
              "typing.Any, block_table: typing.Any, seq_lens: typing.Any, out: typing.Any, scale: "
              "float | None = None, window_left: int = -1, logits_soft_cap: float = 0.0, lse: "
              "typing.Any | None = None, max_seq_len: int = -1, num_splits: int = 0, workspace: "
              "typing.Any | None = None, query_start_loc: typing.Any | None = None, k_scale: "
              "typing.Any | None = None, v_scale: typing.Any | None = None, kv_dtype: str | None "
              "= None, stream: int = 0) -> None"));

  m.def(
      "plan_paged_attention",
      [](nb::handle query, nb::handle key_cache, nb::handle block_table, nb::handle window_left,
         nb::handle max_seq_len, nb::handle num_splits, nb::handle query_start_loc,
         nb::handle kv_dtype, nb::handle host_seq_lens) {
        const char* op = "plan_paged_attention";
        Arrays a(op);
        TensorView q = a.input(query, "query");
        TensorView kc = as_kv_dtype(a.input(key_cache, "key_cache"), kv_dtype, op, "key_cache");
        TensorView bt = a.input(block_table, "block_table");
        AttentionOptions o;
        o.window_left = to_int<int>(window_left, op, "window_left");
        o.max_seq_len = to_int<std::int64_t>(max_seq_len, op, "max_seq_len");
        o.num_splits = to_int<int>(num_splits, op, "num_splits");
        o.query_start_loc = a.optional_input(query_start_loc, "query_start_loc");
        o.host_seq_lens = a.optional_input(host_seq_lens, "host_seq_lens");
        AttentionPlan plan = plan_paged_attention(q, kc, bt, o);
        return std::make_pair(plan.num_splits, plan.workspace_bytes);
      },
      "query"_a.none(), "key_cache"_a.none(), "block_table"_a.none(), "window_left"_a.none() = -1,
      "max_seq_len"_a.none() = -1, "num_splits"_a.none() = 0,
      "query_start_loc"_a.none() = nb::none(), "kv_dtype"_a.none() = nb::none(),
      "host_seq_lens"_a.none() = nb::none(),
      nb::sig("def plan_paged_attention(query: typing.Any, key_cache: typing.Any, block_table: "
              "typing.Any, window_left: int = -1, max_seq_len: int = -1, num_splits: int = 0, "
              "query_start_loc: typing.Any | None = None, kv_dtype: str | None = None, "
              "host_seq_lens: typing.Any | None = None) -> tuple[int, int]"),
      "Returns (num_splits, workspace_bytes) that paged_attention uses for these arguments.");

  m.def(
      "copy_blocks",
      [](nb::handle caches, nb::handle src, nb::handle dst, nb::handle stream) {
        const char* op = "copy_blocks";
        Arrays a(op);
        std::vector<TensorView> views = a.output_list(caches, "caches");
        TensorView s = a.input(src, "src"), d = a.input(dst, "dst");
        Stream st = to_int<Stream>(stream, op, "stream");
        nb::gil_scoped_release release;
        copy_blocks(views, s, d, st);
      },
      "caches"_a.none(), "src"_a.none(), "dst"_a.none(), "stream"_a.none() = 0,
      nb::sig("def copy_blocks(caches: list[typing.Any] | tuple[typing.Any, ...], src: typing.Any, "
              "dst: typing.Any, stream: int = 0) -> None"));

  m.def(
      "swap_blocks",
      [](nb::handle src_cache, nb::handle dst_cache, nb::handle src, nb::handle dst,
         nb::handle stream) {
        const char* op = "swap_blocks";
        Arrays a(op);
        TensorView sc = a.input(src_cache, "src_cache");
        TensorView dc = a.output(dst_cache, "dst_cache");
        TensorView s = a.input(src, "src"), d = a.input(dst, "dst");
        Stream st = to_int<Stream>(stream, op, "stream");
        nb::gil_scoped_release release;
        swap_blocks(sc, dc, s, d, st);
      },
      "src_cache"_a.none(), "dst_cache"_a.none(), "src"_a.none(), "dst"_a.none(),
      "stream"_a.none() = 0,
      nb::sig("def swap_blocks(src_cache: typing.Any, dst_cache: typing.Any, src: typing.Any, dst: "
              "typing.Any, stream: int = 0) -> None"));

  m.def(
      "_stream_synchronize",
      [](nb::handle stream) {
        Stream s = to_int<Stream>(stream, "synchronize", "stream");
        nb::gil_scoped_release release;
        cuda_stream_synchronize(s);
      },
      "stream"_a.none(), nb::sig("def _stream_synchronize(stream: int) -> None"),
      "Waits for the CUDA stream (used where a framework shares no stream).");

  m.def(
      "_array_shape",
      [](nb::handle h) -> nb::object {
        // What the core would import (DLPack or the buffer protocol), any dtype and device.
        nb::ndarray<nb::ro> a;
        if (!nb::try_cast(h, a, /*convert=*/false)) return nb::none();
        nb::list shape;
        for (std::size_t i = 0; i < a.ndim(); ++i) shape.append(a.shape(i));
        return nb::tuple(shape);
      },
      "array"_a.none(), nb::sig("def _array_shape(array: object) -> tuple[int, ...] | None"),
      "The shape of an array as the ops import it, or None for an object that is no array.");

  m.def("cuda_compiled", &cuda_compiled, "True when the library was built with CUDA kernels.");
  m.def("cuda_device_count", &cuda_device_count,
        "CUDA devices visible to tinyserve (0 without CUDA, driver or device).");
  m.def("num_threads", &num_threads,
        "Worker threads of the CPU backend: as many as asked for, or fewer when the system could "
        "not start that many.");
  m.def(
      "set_num_threads",
      [](nb::handle n) { set_num_threads(to_int<int>(n, "set_num_threads", "n")); }, "n"_a.none(),
      nb::sig("def set_num_threads(n: int) -> None"),
      "Sets the CPU backend's worker threads, n in [1, 1024].");
  m.def("cpu_hardware_float16", &cpu_hardware_float16,
        "True when the CPU backend converts float16 with the processor's F16C instructions.");
}

}  // namespace tinyserve::bindings
