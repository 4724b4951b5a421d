#include "tinyserve/cache_pool.h"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/validate.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace tinyserve::bindings {

namespace {

DType parse_dtype(const std::string& name) {
  if (name == "float16") return DType::Float16;
  if (name == "bfloat16") return DType::BFloat16;
  if (name == "float32") return DType::Float32;
  detail::fail("CachePool", "dtype must be float16, bfloat16 or float32, got ", name);
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
          [](CachePool* self, int num_layers, std::int64_t max_blocks, int block_size,
             int num_kv_heads, int head_dim, const std::string& dtype, const std::string& device,
             const std::string& layout, bool page_meta, std::size_t granule_bytes,
             std::int64_t num_blocks) {
            CachePoolConfig c;
            c.num_layers = num_layers;
            c.max_blocks = max_blocks;
            c.block_size = block_size;
            c.num_kv_heads = num_kv_heads;
            c.head_dim = head_dim;
            c.dtype = parse_dtype(dtype);
            c.device = parse_device(device);
            c.layout = parse_layout(layout);
            c.page_meta = page_meta;
            c.granule_bytes = granule_bytes;
            c.num_blocks = num_blocks;
            nb::gil_scoped_release release;
            new (self) CachePool(c);
          },
          "num_layers"_a, "max_blocks"_a, "block_size"_a, "num_kv_heads"_a, "head_dim"_a,
          "dtype"_a = "float16", "device"_a = "cpu", "layout"_a = "NHD", "page_meta"_a = false,
          "granule_bytes"_a = 0, "num_blocks"_a = 0)
      .def("grow", &CachePool::grow, "num_blocks"_a, nb::call_guard<nb::gil_scoped_release>(),
           "Backs blocks up to num_blocks (at least num_blocks, at most max_blocks); the new "
           "blocks' contents are unspecified. All or nothing. Fetch views again afterwards.")
      .def("shrink", &CachePool::shrink, "num_blocks"_a, nb::call_guard<nb::gil_scoped_release>(),
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
          [](const CachePool& self, int layer) {
            return as_array(self.key(layer), nb::find(&self));
          },
          "layer"_a,
          "Layer's key cache [num_blocks, block_size, num_kv_heads, head_dim] (HND: a permuted "
          "view), a DLPack array over the pool's memory.")
      .def(
          "value",
          [](const CachePool& self, int layer) {
            return as_array(self.value(layer), nb::find(&self));
          },
          "layer"_a, "Layer's value cache, like key().")
      .def(
          "page_meta",
          [](const CachePool& self, int layer) {
            return as_array(self.page_meta(layer), nb::find(&self));
          },
          "layer"_a,
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
