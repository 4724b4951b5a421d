#include "tinyserve/cache_pool.h"

#include <algorithm>
#include <limits>
#include <mutex>
#include <stdexcept>
#include <string>

#include "core/kernels.h"
#include "core/validate.h"
#include "core/virtual_memory.h"

namespace tinyserve {
namespace {

template <class... Args>
std::string message(const char* method, const Args&... args) {
  // The one message builder (no iostreams: the library may share a process with another C++
  // runtime, whose locale facets an ostream here would touch).
  return detail::concat("tinyserve.CachePool", *method ? "." : "", method, ": ", args...);
}

template <class... Args>
[[noreturn]] void bad_argument(const char* method, const Args&... args) {
  throw std::invalid_argument(message(method, args...));
}

std::size_t round_up(std::size_t n, std::size_t unit) { return (n + unit - 1) / unit * unit; }

enum class Part : std::int8_t { Key, Value, PageMeta };

// One tensor's share of the reserved range: granules [first, first + reserved), of which the
// first `mapped` are backed.
struct TensorRegion {
  Part part = Part::Key;
  int layer = 0;
  std::size_t block_bytes = 0;
  std::size_t first = 0;
  std::size_t reserved = 0;
  std::size_t mapped = 0;
};

}  // namespace

struct CachePool::Impl {
  CachePoolConfig config;
  std::size_t granule = 0;
  std::vector<TensorRegion> regions;
  std::unique_ptr<VirtualRegion> memory;
  std::int64_t num_blocks = 0;
  mutable std::mutex mutex;

  std::size_t granules_for(const TensorRegion& r, std::int64_t blocks) const {
    return (std::size_t(blocks) * r.block_bytes + granule - 1) / granule;
  }

  std::size_t mapped_bytes() const {
    std::size_t n = 0;
    for (const TensorRegion& r : regions) n += r.mapped * granule;
    return n;
  }

  // Backs every tensor up to `blocks`; all or nothing.
  void map_to(std::int64_t blocks, const char* op) {
    std::size_t done = 0;
    try {
      for (; done < regions.size(); ++done) {
        TensorRegion& r = regions[done];
        const std::size_t need = granules_for(r, blocks);
        if (need > r.mapped) memory->map(r.first + r.mapped, need - r.mapped, op);
      }
    } catch (...) {
      for (std::size_t i = 0; i < done; ++i) {
        const TensorRegion& r = regions[i];
        const std::size_t need = granules_for(r, blocks);
        if (need > r.mapped) memory->unmap(r.first + r.mapped, need - r.mapped, op);
      }
      throw;
    }
    for (TensorRegion& r : regions) r.mapped = std::max(r.mapped, granules_for(r, blocks));
  }

  TensorView view(const TensorRegion& r) const {
    const CachePoolConfig& c = config;
    TensorView t;
    t.data = static_cast<char*>(memory->base()) + r.first * granule;
    t.dtype = r.part == Part::PageMeta ? c.page_meta_dtype.value_or(c.dtype) : c.dtype;
    t.device = c.device;
    t.ndim = 4;
    const std::int64_t bs = c.block_size, h = c.num_kv_heads, d = c.head_dim;
    if (r.part == Part::PageMeta) {
      const std::int64_t shape[4] = {num_blocks, h, 2, d};
      const std::int64_t strides[4] = {h * 2 * d, 2 * d, d, 1};
      std::copy(shape, shape + 4, t.shape);
      std::copy(strides, strides + 4, t.strides);
      return t;
    }
    const std::int64_t shape[4] = {num_blocks, bs, h, d};
    std::copy(shape, shape + 4, t.shape);
    t.strides[0] = bs * h * d;
    t.strides[3] = 1;
    if (c.layout == CacheLayout::NHD) {
      t.strides[1] = h * d;
      t.strides[2] = d;
    } else {
      t.strides[1] = d;
      t.strides[2] = bs * d;
    }
    return t;
  }

  const TensorRegion& region(int layer, Part part, const char* method) const {
    if (layer < 0 || layer >= config.num_layers) {
      bad_argument(method, "layer must be in [0, ", config.num_layers, "), got ", layer);
    }
    const int per_layer = config.page_meta ? 3 : 2;
    return regions[std::size_t(layer) * per_layer + int(part)];
  }
};

CachePool::CachePool(const CachePoolConfig& config) : impl_(std::make_unique<Impl>()) {
  const char* op = "";
  const CachePoolConfig& c = config;
  if (c.num_layers < 1) bad_argument(op, "num_layers must be at least 1, got ", c.num_layers);
  if (c.max_blocks < 1 || c.max_blocks > std::numeric_limits<std::int32_t>::max()) {
    bad_argument(op, "max_blocks must be in [1, 2^31 - 1] (block ids are int32), got ",
                 c.max_blocks);
  }
  if (c.block_size < 1) bad_argument(op, "block_size must be at least 1, got ", c.block_size);
  if (c.num_kv_heads < 1) {
    bad_argument(op, "num_kv_heads must be at least 1, got ", c.num_kv_heads);
  }
  if (c.head_dim < 1) bad_argument(op, "head_dim must be at least 1, got ", c.head_dim);
  const auto wide = [](DType t) {
    return t == DType::Float16 || t == DType::BFloat16 || t == DType::Float32;
  };
  if (!wide(c.dtype) && c.dtype != DType::Float8E4M3FN) {
    bad_argument(op, "dtype must be float16, bfloat16, float32 or float8_e4m3fn, got ",
                 dtype_name(c.dtype));
  }
  if (c.page_meta_dtype) {
    const DType m = *c.page_meta_dtype;
    if (!c.page_meta) {
      bad_argument(op, dtype_name(m), " page summaries need page_meta, got page_meta false");
    }
    // Float8 summaries always; over float8 caches any wide dtype (the query's precision), else
    // the caches' own.
    if (c.dtype == DType::Float8E4M3FN) {
      if (m != DType::Float8E4M3FN && !wide(m)) {
        bad_argument(op,
                     "page_meta_dtype over float8_e4m3fn caches must be float16, bfloat16, "
                     "float32 or float8_e4m3fn, got ",
                     dtype_name(m));
      }
    } else if (m != DType::Float8E4M3FN && m != c.dtype) {
      bad_argument(op, "page_meta_dtype must be the caches' dtype (", dtype_name(c.dtype),
                   ") or float8_e4m3fn, got ", dtype_name(m));
    }
  }
  if (c.num_blocks < 0 || c.num_blocks > c.max_blocks) {
    bad_argument(op, "num_blocks must be in [0, max_blocks = ", c.max_blocks, "], got ",
                 c.num_blocks);
  }
  const std::size_t elem = dtype_size(c.dtype);
  const std::size_t meta_elem = dtype_size(c.page_meta_dtype.value_or(c.dtype));
  // 2^60 bytes of address space is far beyond any machine; the bound keeps the sums exact (with
  // room for each tensor's granule rounding). The estimate is taken in double before any size_t
  // product, which could wrap.
  const double block_estimate =
      double(c.num_kv_heads) * double(c.head_dim) *
      (2.0 * double(c.block_size) * double(elem) + (c.page_meta ? 2.0 * double(meta_elem) : 0.0));
  const double reserve_estimate = double(c.max_blocks) * double(c.num_layers) * block_estimate;
  if (reserve_estimate > double(std::size_t(1) << 60)) {
    bad_argument(op, "the pool would reserve more than 2^60 bytes, got max_blocks ", c.max_blocks,
                 " x block_size ", c.block_size, " x num_kv_heads ", c.num_kv_heads, " x head_dim ",
                 c.head_dim, " x ", elem, "-byte elements over ", c.num_layers, " layers");
  }
  const std::size_t kv_block = std::size_t(c.block_size) * c.num_kv_heads * c.head_dim * elem;
  const std::size_t meta_block = std::size_t(c.num_kv_heads) * 2 * c.head_dim * meta_elem;
  const int per_layer = c.page_meta ? 3 : 2;

  std::size_t min_granule = 0, default_granule = 0;
  if (c.device.type == DeviceType::CPU) {
    min_granule = default_granule = kernels::cpu::page_bytes();
  } else if (c.device.type == DeviceType::CUDA) {
    if (!kernels::cuda::compiled()) {
      throw std::runtime_error(
          message(op, "device is cuda:", c.device.index, " but tinyserve was built without CUDA"));
    }
    const int count = kernels::cuda::device_count();
    if (c.device.index < 0 || c.device.index >= count) {
      throw std::runtime_error(message(op, "device is cuda:", c.device.index, " but ", count,
                                       " CUDA device(s) are available"));
    }
    min_granule = kernels::cuda::vmm_min_granule(c.device.index, "CachePool");
    default_granule = kernels::cuda::vmm_recommended_granule(c.device.index, "CachePool");
  } else {
    bad_argument(op, "device must be cpu or cuda, got ", device_name(c.device.type));
  }
  const std::size_t granule = c.granule_bytes == 0 ? default_granule : c.granule_bytes;
  if (granule % min_granule != 0) {
    bad_argument(op, "granule_bytes must be a multiple of ", min_granule, " on ",
                 device_name(c.device.type), ", got ", c.granule_bytes);
  }

  Impl& p = *impl_;
  p.config = c;
  p.config.granule_bytes = granule;
  p.granule = granule;
  std::size_t next = 0;
  for (int layer = 0; layer < c.num_layers; ++layer) {
    for (int part = 0; part < per_layer; ++part) {
      TensorRegion r;
      r.part = Part(part);
      r.layer = layer;
      r.block_bytes = r.part == Part::PageMeta ? meta_block : kv_block;
      r.first = next;
      r.reserved = round_up(std::size_t(c.max_blocks) * r.block_bytes, granule) / granule;
      next += r.reserved;
      p.regions.push_back(r);
    }
  }
  if (c.device.type == DeviceType::CPU) {
    p.memory = kernels::cpu::reserve_region(next, granule, "CachePool");
  } else {
    p.memory = kernels::cuda::reserve_region(c.device.index, next, granule, "CachePool");
  }
  p.map_to(c.num_blocks, "CachePool");
  p.num_blocks = c.num_blocks;
}

CachePool::~CachePool() = default;

void CachePool::grow(std::int64_t num_blocks) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Impl& p = *impl_;
  if (num_blocks < p.num_blocks || num_blocks > p.config.max_blocks) {
    bad_argument("grow", "num_blocks must be in [num_blocks = ", p.num_blocks,
                 ", max_blocks = ", p.config.max_blocks, "], got ", num_blocks);
  }
  p.map_to(num_blocks, "CachePool.grow");
  p.num_blocks = num_blocks;
}

void CachePool::shrink(std::int64_t num_blocks) {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  Impl& p = *impl_;
  if (num_blocks < 0 || num_blocks > p.num_blocks) {
    bad_argument("shrink", "num_blocks must be in [0, num_blocks = ", p.num_blocks, "], got ",
                 num_blocks);
  }
  const char* op = "CachePool.shrink";
  p.memory->quiesce(op);
  p.num_blocks = num_blocks;
  for (TensorRegion& r : p.regions) {
    const std::size_t keep = p.granules_for(r, num_blocks);
    if (keep < r.mapped) p.memory->unmap(r.first + keep, r.mapped - keep, op);
    r.mapped = std::min(r.mapped, keep);
  }
}

std::int64_t CachePool::num_blocks() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->num_blocks;
}

const CachePoolConfig& CachePool::config() const { return impl_->config; }

std::size_t CachePool::granule_bytes() const { return impl_->granule; }

std::size_t CachePool::mapped_bytes() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->mapped_bytes();
}

std::size_t CachePool::reserved_bytes() const {
  return impl_->memory->num_granules() * impl_->granule;
}

std::size_t CachePool::bytes_per_block() const {
  std::size_t n = 0;
  for (const TensorRegion& r : impl_->regions) n += r.block_bytes;
  return n;
}

int CachePool::num_tensors() const { return int(impl_->regions.size()); }

TensorView CachePool::key(int layer) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->view(impl_->region(layer, Part::Key, "key"));
}

TensorView CachePool::value(int layer) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  return impl_->view(impl_->region(layer, Part::Value, "value"));
}

TensorView CachePool::page_meta(int layer) const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  if (!impl_->config.page_meta) {
    bad_argument("page_meta", "the pool holds no page summaries (made with page_meta=False), got ",
                 "a request for layer ", layer);
  }
  return impl_->view(impl_->region(layer, Part::PageMeta, "page_meta"));
}

std::vector<TensorView> CachePool::tensors() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  std::vector<TensorView> out;
  out.reserve(impl_->regions.size());
  for (const TensorRegion& r : impl_->regions) out.push_back(impl_->view(r));
  return out;
}

void CachePool::check() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  const Impl& p = *impl_;
  auto fail = [](const std::string& what) {
    throw std::logic_error("tinyserve.CachePool.check: " + what);
  };
  if (p.num_blocks < 0 || p.num_blocks > p.config.max_blocks) {
    fail("num_blocks " + std::to_string(p.num_blocks) + " is outside [0, max_blocks]");
  }
  std::size_t next = 0;
  for (const TensorRegion& r : p.regions) {
    if (r.first != next) fail("tensor regions are not laid out back to back");
    next += r.reserved;
    const std::size_t need = p.granules_for(r, p.num_blocks);
    if (r.mapped != need || r.mapped > r.reserved) {
      fail("layer " + std::to_string(r.layer) + " tensor " + std::to_string(int(r.part)) +
           " records " + std::to_string(r.mapped) + " mapped granules, its blocks need " +
           std::to_string(need));
    }
    for (std::size_t i = 0; i < r.reserved; ++i) {
      if (p.memory->is_mapped(r.first + i) != (i < need)) {
        fail("granule " + std::to_string(r.first + i) + " is " +
             (i < need ? "unmapped but holds blocks" : "mapped past the pool's blocks"));
      }
    }
  }
  if (next != p.memory->num_granules()) fail("tensor regions do not cover the reserved range");
}

}  // namespace tinyserve
