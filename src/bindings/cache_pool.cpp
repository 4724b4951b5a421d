#include "tinyserve/cache_pool.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "bindings/convert.h"
#include "core/validate.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

namespace {

// A pool's dtype name; the core checks which of them each argument takes.
DType parse_dtype(const std::string& name, const char* argument) {
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "float32") return DType::Float32;
  if (name == "float8_e4m3fn") return DType::Float8E4M3FN;
  detail::fail("CachePool", argument, " must be float16, bfloat16, float32 or float8_e4m3fn, got ",
               name);
}

Device parse_device(const std::string& name) {
  if (name == "cpu") return {DeviceType::CPU, 0};
  if (name == "cuda") return {DeviceType::CUDA, 0};
  if (name.rfind("cuda:", 0) == 0 && name.size() > 5 &&
      name.find_first_not_of("0123456789", 5) == std::string::npos && name.size() < 15) {
    return {DeviceType::CUDA, std::stoi(name.substr(5))};
  }
  detail::fail("CachePool", "device must be 'cpu', 'cuda' or 'cuda:N', got '", name, "'");
}

CacheLayout parse_layout(const std::string& name) {
  if (name == "NHD") return CacheLayout::NHD;
  if (name == "HND") return CacheLayout::HND;
  detail::fail("CachePool", "layout must be 'NHD' or 'HND', got '", name, "'");
}

std::string device_string(Device d) {
  return d.type == DeviceType::CPU ? "cpu" : "cuda:" + std::to_string(d.index);
}

nb::dlpack::dtype dlpack_dtype(DType t) {
  switch (t) {
    case DType::Float16:
      return {std::uint8_t(nb::dlpack::dtype_code::Float), 16, 1};
    case DType::BFloat16:
      return {std::uint8_t(nb::dlpack::dtype_code::Bfloat), 16, 1};
    case DType::Float8E4M3FN:
      return {std::uint8_t(nb::dlpack::dtype_code::Float8_E4M3FN), 8, 1};
    default:
      return nb::dtype<float>();
  }
}

// A DLPack array over the pool's memory; it keeps the pool object alive.
nb::ndarray<nb::array_api> as_array(const TensorView& t, nb::handle owner) {
  std::size_t shape[kMaxDims];
  for (int i = 0; i < t.ndim; ++i) shape[i] = std::size_t(t.shape[i]);
  const int device_type =
      t.device.type == DeviceType::CPU ? nb::device::cpu::value : nb::device::cuda::value;
  return nb::ndarray<nb::array_api>(t.data, std::size_t(t.ndim), shape, owner, t.strides,
                                    dlpack_dtype(t.dtype), device_type, t.device.index);
}

}  // namespace

void bind_cache_pool(nb::module_& m) {
  nb::class_<CachePool>(m, "CachePool",
                        "The memory of a paged KV cache: an address range reserved for max_blocks, "
                        "backed by physical memory in granules up to num_blocks (CUDA virtual "
                        "memory management on a GPU, mmap on the CPU). Use tinyserve.CachePool, "
                        "which accepts framework dtypes and devices.")
      .def(
          "__init__",
          [](CachePool* self, nb::handle num_layers, nb::handle max_blocks, nb::handle block_size,
             nb::handle num_kv_heads, nb::handle head_dim, nb::handle dtype, nb::handle device,
             nb::handle layout, nb::handle page_meta, nb::handle granule_bytes,
             nb::handle num_blocks, nb::handle page_meta_dtype) {
            constexpr const char* op = "CachePool";
            CachePoolConfig c;
            c.num_layers = to_int<int>(num_layers, op, "num_layers");
            c.max_blocks = to_int<std::int64_t>(max_blocks, op, "max_blocks");
            c.block_size = to_int<int>(block_size, op, "block_size");
            c.num_kv_heads = to_int<int>(num_kv_heads, op, "num_kv_heads");
            c.head_dim = to_int<int>(head_dim, op, "head_dim");
            c.dtype = parse_dtype(to_name(dtype, op, "dtype"), "dtype");
            c.device = parse_device(to_name(device, op, "device"));
            c.layout = parse_layout(to_name(layout, op, "layout"));
            c.page_meta = to_bool(page_meta, op, "page_meta");
            if (!page_meta_dtype.is_none()) {
              c.page_meta_dtype =
                  parse_dtype(to_name(page_meta_dtype, op, "page_meta_dtype"), "page_meta_dtype");
            }
            c.granule_bytes = to_int<std::size_t>(granule_bytes, op, "granule_bytes");
            c.num_blocks = to_int<std::int64_t>(num_blocks, op, "num_blocks");
            nb::gil_scoped_release release;
            new (self) CachePool(c);
          },
          // .none(): None reaches the conversions, which name the argument it was passed for.
          "num_layers"_a.none(), "max_blocks"_a.none(), "block_size"_a.none(),
          "num_kv_heads"_a.none(), "head_dim"_a.none(), "dtype"_a.none() = "float16",
          "device"_a.none() = "cpu", "layout"_a.none() = "NHD", "page_meta"_a.none() = false,
          "granule_bytes"_a.none() = 0, "num_blocks"_a.none() = 0,
          "page_meta_dtype"_a.none() = nb::none(),
          nb::sig("def __init__(self, num_layers: int, max_blocks: int, block_size: int, "
                  "num_kv_heads: int, head_dim: int, dtype: str = 'float16', device: str = 'cpu', "
                  "layout: str = 'NHD', page_meta: bool = False, granule_bytes: int = 0, "
                  "num_blocks: int = 0, page_meta_dtype: str | None = None) -> None"))
      .def(
          "grow",
          [](CachePool& self, nb::handle num_blocks) {
            const std::int64_t n = to_int<std::int64_t>(num_blocks, "CachePool.grow", "num_blocks");
            nb::gil_scoped_release release;
            self.grow(n);
          },
          "num_blocks"_a.none(), nb::sig("def grow(self, num_blocks: int) -> None"),
          "Backs blocks up to num_blocks (at least num_blocks, at most max_blocks); the new "
          "blocks' contents are unspecified. All or nothing. Fetch views again afterwards.")
      .def(
          "shrink",
          [](CachePool& self, nb::handle num_blocks) {
            const std::int64_t n =
                to_int<std::int64_t>(num_blocks, "CachePool.shrink", "num_blocks");
            nb::gil_scoped_release release;
            self.shrink(n);
          },
          "num_blocks"_a.none(), nb::sig("def shrink(self, num_blocks: int) -> None"),
          "Keeps blocks [0, num_blocks) and returns every granule past them to the driver (CUDA, "
          "after waiting for all work on the device) or the OS. Views fetched before must not "
          "touch blocks at or past num_blocks.")
      .def_prop_ro("num_blocks", &CachePool::num_blocks)
      .def_prop_ro("max_blocks", [](const CachePool& p) { return p.config().max_blocks; })
      .def_prop_ro("num_layers", [](const CachePool& p) { return p.config().num_layers; })
      .def_prop_ro("block_size", [](const CachePool& p) { return p.config().block_size; })
      .def_prop_ro("num_kv_heads", [](const CachePool& p) { return p.config().num_kv_heads; })
      .def_prop_ro("head_dim", [](const CachePool& p) { return p.config().head_dim; })
      .def_prop_ro("dtype",
                   [](const CachePool& p) { return std::string(dtype_name(p.config().dtype)); })
      .def_prop_ro("device", [](const CachePool& p) { return device_string(p.config().device); })
      .def_prop_ro("layout",
                   [](const CachePool& p) {
                     return std::string(p.config().layout == CacheLayout::NHD ? "NHD" : "HND");
                   })
      .def_prop_ro("has_page_meta", [](const CachePool& p) { return p.config().page_meta; })
      .def_prop_ro(
          "page_meta_dtype",
          [](const CachePool& p) -> std::optional<std::string> {
            const CachePoolConfig& c = p.config();
            if (!c.page_meta) return std::nullopt;
            return std::string(dtype_name(c.page_meta_dtype.value_or(c.dtype)));
          },
          "The page summaries' dtype name (None without page_meta).")
      .def_prop_ro("granule_bytes", &CachePool::granule_bytes, "The unit of mapping, in bytes.")
      .def_prop_ro("mapped_bytes", &CachePool::mapped_bytes,
                   "Physical memory backing the pool now, in bytes (whole granules).")
      .def_prop_ro("reserved_bytes", &CachePool::reserved_bytes,
                   "The reserved address range, in bytes.")
      .def_prop_ro("bytes_per_block", &CachePool::bytes_per_block,
                   "Bytes of one block over every tensor (K, V and page summaries of all layers).")
      .def_prop_ro("num_tensors", &CachePool::num_tensors)
      .def(
          "key",
          [](const CachePool& self, nb::handle layer) {
            const int index = to_int<int>(layer, "CachePool.key", "layer");
            return as_array(self.key(index), nb::find(&self));
          },
          "layer"_a.none(), nb::sig("def key(self, layer: int) -> Any"),
          "Layer's key cache [num_blocks, block_size, num_kv_heads, head_dim] (HND: a permuted "
          "view), a DLPack array over the pool's memory.")
      .def(
          "value",
          [](const CachePool& self, nb::handle layer) {
            const int index = to_int<int>(layer, "CachePool.value", "layer");
            return as_array(self.value(index), nb::find(&self));
          },
          "layer"_a.none(), nb::sig("def value(self, layer: int) -> Any"),
          "Layer's value cache, like key().")
      .def(
          "page_meta",
          [](const CachePool& self, nb::handle layer) {
            const int index = to_int<int>(layer, "CachePool.page_meta", "layer");
            return as_array(self.page_meta(index), nb::find(&self));
          },
          "layer"_a.none(), nb::sig("def page_meta(self, layer: int) -> Any"),
          "Layer's page summaries [num_blocks, num_kv_heads, 2, head_dim] (pools made with "
          "page_meta=True).")
      .def(
          "tensors",
          [](const CachePool& self) {
            std::vector<nb::ndarray<nb::array_api>> out;
            nb::handle owner = nb::find(&self);
            for (const TensorView& t : self.tensors()) out.push_back(as_array(t, owner));
            return out;
          },
          "Every tensor, layer by layer: K, V (and page summaries): the list copy_blocks takes.")
      .def("check", &CachePool::check, nb::call_guard<nb::gil_scoped_release>(),
           "Verifies the invariants against the backend's record of what is mapped; raises "
           "RuntimeError naming the first violation.")
      .def("__repr__", [](const CachePool& p) {
        const CachePoolConfig& c = p.config();
        return "CachePool(num_layers=" + std::to_string(c.num_layers) +
               ", num_blocks=" + std::to_string(p.num_blocks()) +
               ", max_blocks=" + std::to_string(c.max_blocks) +
               ", block_size=" + std::to_string(c.block_size) +
               ", num_kv_heads=" + std::to_string(c.num_kv_heads) +
               ", head_dim=" + std::to_string(c.head_dim) + ", dtype=" + dtype_name(c.dtype) +
               ", device=" + device_string(c.device) +
               ", mapped_bytes=" + std::to_string(p.mapped_bytes()) + ")";
      });
}

}  // namespace tinyserve::bindings
