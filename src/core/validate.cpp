#include "core/validate.h"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <utility>

#include "core/kernels.h"

namespace tinyserve::detail {

namespace {

struct Extent {
  std::int64_t stride, size;  // |stride| in elements, size > 1
};

// The dimensions that move the address, by |stride|, largest first (no allocation: these run
// for every tensor of every call).
struct Extents {
  Extent dims[kMaxDims];
  std::size_t count = 0;
  std::size_t size() const { return count; }
  const Extent& operator[](std::size_t i) const { return dims[i]; }
};

Extents moving_dims(const TensorView& t) {
  Extents e;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] > 1) e.dims[e.count++] = {std::llabs(t.strides[i]), t.shape[i]};
  }
  // Insertion sort: at most kMaxDims entries.
  for (std::size_t i = 1; i < e.count; ++i) {
    for (std::size_t j = i; j > 0 && e.dims[j - 1].stride < e.dims[j].stride; --j) {
      std::swap(e.dims[j - 1], e.dims[j]);
    }
  }
  return e;
}

std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  return a / b - ((a % b != 0) && ((a < 0) != (b < 0)));
}

// One dimension of the difference of two index tuples (one per view): |stride| in elements,
// and the range [lo, hi] of the digit d = i_a - i_b.
struct Digit {
  std::int64_t stride, lo, hi;
};

struct Digits {
  Digit dims[kMaxDims];
  std::size_t count = 0;
};

// Whether `offset` (elements) is sum_k d_k * dims[k].stride with each d_k in its range, for k >=
// first: the difference of two index tuples. With non-overlapping views at most a few digits fit
// each level, so the search stays tiny.
bool reachable(const Digits& dims, std::size_t first, std::int64_t offset) {
  if (first == dims.count) return offset == 0;
  std::int64_t rest_lo = 0, rest_hi = 0;  // what the smaller dimensions reach
  for (std::size_t k = first + 1; k < dims.count; ++k) {
    rest_lo += dims.dims[k].lo * dims.dims[k].stride;
    rest_hi += dims.dims[k].hi * dims.dims[k].stride;
  }
  const Digit& e = dims.dims[first];
  const std::int64_t lo = std::max(e.lo, -floor_div(-(offset - rest_hi), e.stride));
  const std::int64_t hi = std::min(e.hi, floor_div(offset - rest_lo, e.stride));
  for (std::int64_t d = lo; d <= hi; ++d) {
    if (reachable(dims, first + 1, offset - d * e.stride)) return true;
  }
  return false;
}

// The digits of two views that step through memory alike: the same element size and rank, and
// the same stride in every dimension where either moves (the shapes may differ: slices of
// different widths of one buffer). False where they do not.
bool pair_digits(const TensorView& a, const TensorView& b, Digits& out) {
  if (dtype_size(a.dtype) != dtype_size(b.dtype) || a.ndim != b.ndim) return false;
  for (int i = 0; i < a.ndim; ++i) {
    const std::int64_t na = a.shape[i], nb = b.shape[i];
    if (na <= 1 && nb <= 1) continue;
    if (na > 1 && nb > 1 && a.strides[i] != b.strides[i]) return false;
    const std::int64_t stride = na > 1 ? a.strides[i] : b.strides[i];
    if (stride == 0) return false;
    // a + i * stride = b + j * stride: d = i - j in [-(nb - 1), na - 1], negated for a
    // negative stride so that every stride is positive.
    Digit d = {std::llabs(stride), -(nb - 1), na - 1};
    if (stride < 0) d = {-stride, -(na - 1), nb - 1};
    std::size_t k = out.count++;
    for (; k > 0 && out.dims[k - 1].stride < d.stride; --k) out.dims[k] = out.dims[k - 1];
    out.dims[k] = d;
  }
  return true;
}

}  // namespace

std::pair<std::uintptr_t, std::uintptr_t> byte_range(const TensorView& t) {
  const std::intptr_t elem = std::intptr_t(dtype_size(t.dtype));
  std::intptr_t lo = 0, hi = 0;
  for (int i = 0; i < t.ndim; ++i) {
    const std::intptr_t reach = std::intptr_t(t.shape[i] - 1) * t.strides[i];
    (reach < 0 ? lo : hi) += reach;
  }
  const std::uintptr_t base = reinterpret_cast<std::uintptr_t>(t.data);
  return {base + std::uintptr_t(lo * elem), base + std::uintptr_t((hi + 1) * elem)};
}

bool non_overlapping(const TensorView& t) {
  if (t.numel() <= 1) return true;
  const Extents dims = moving_dims(t);
  std::int64_t span = 0;  // the largest offset that the smaller dimensions reach
  for (std::size_t k = dims.size(); k-- > 0;) {
    if (dims[k].stride <= span) return false;
    span += (dims[k].size - 1) * dims[k].stride;
  }
  return true;
}

bool may_overlap(const TensorView& a, const TensorView& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  auto [alo, ahi] = byte_range(a);
  auto [blo, bhi] = byte_range(b);
  if (ahi <= blo || bhi <= alo) return false;
  // Views that step alike (K and V as two views of one tensor, column slices of one buffer):
  // exactly, by whether the distance between them is a difference of two index tuples.
  // Anything else whose ranges meet counts as overlapping.
  const std::intptr_t elem = std::intptr_t(dtype_size(a.dtype));
  Digits digits;
  if (!non_overlapping(a) || !non_overlapping(b) || !pair_digits(a, b, digits)) return true;
  const std::intptr_t delta =
      reinterpret_cast<std::intptr_t>(b.data) - reinterpret_cast<std::intptr_t>(a.data);
  if (delta % elem != 0) return true;
  return reachable(digits, 0, delta / elem);
}

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += concat(i ? ", " : "", t.shape[i]);
  return s + "]";
}

std::string strides_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += concat(i ? ", " : "", t.strides[i]);
  return s + "]";
}

std::string device_str(Device d) {
  if (d.type == DeviceType::CPU) return "cpu";
  return concat(device_name(d.type), ':', d.index);
}

void OpCheck::ndim(const TensorView& t, const char* name, int n, const char* dims) const {
  if (t.ndim != n) {
    fail(name, " must have ", n, " dimensions ", dims, ", got ", t.ndim, " (shape ", shape_str(t),
         ")");
  }
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] < 0) fail(name, " has a negative extent, got shape ", shape_str(t));
  }
  if (t.data == nullptr && t.numel() > 0) fail(name, " has no data, got a null pointer");
}

void OpCheck::dtype(const TensorView& t, const char* name, DType expected) const {
  if (t.dtype != expected) {
    fail(name, " must be ", dtype_name(expected), ", got ", dtype_name(t.dtype));
  }
}

void OpCheck::attention_dtype(const TensorView& t, const char* name) const {
  if (t.dtype != DType::Float32 && t.dtype != DType::Float16 && t.dtype != DType::BFloat16) {
    fail(name, " must be float32, float16 or bfloat16, got ", dtype_name(t.dtype));
  }
}

void OpCheck::same_dtype(const TensorView& a, const char* an, const TensorView& b,
                         const char* bn) const {
  if (a.dtype != b.dtype) {
    fail(bn, " must have the dtype of ", an, " (", dtype_name(a.dtype), "), got ",
         dtype_name(b.dtype));
  }
}

void OpCheck::dim(const TensorView& t, const char* name, int d, std::int64_t expected,
                  const char* what) const {
  if (t.shape[d] != expected) {
    fail(name, " dimension ", d, " (", what, ") must be ", expected, ", got ", t.shape[d],
         " (shape ", shape_str(t), ")");
  }
}

void OpCheck::last_dim_contiguous(const TensorView& t, const char* name) const {
  // Strides of an empty tensor mean nothing (producers report arbitrary ones).
  if (t.ndim > 0 && t.numel() > 0 && t.shape[t.ndim - 1] > 1 && t.strides[t.ndim - 1] != 1) {
    fail(name, " must be contiguous in its last dimension, got stride ", t.strides[t.ndim - 1]);
  }
}

void OpCheck::distinct_elements(const TensorView& t, const char* name) const {
  if (!non_overlapping(t)) {
    fail(name, " must not reach one element's memory twice, got strides ", strides_str(t),
         " for shape ", shape_str(t));
  }
}

void OpCheck::writable(const TensorView& t, const char* name) const {
  last_dim_contiguous(t, name);
  distinct_elements(t, name);
}

std::size_t OpCheck::workspace(const TensorView& ws) const {
  std::int64_t expect = 1;
  for (int d = ws.ndim - 1; d >= 0; --d) {
    if (ws.shape[d] > 1 && ws.strides[d] != expect) {
      fail("workspace must be contiguous, got strides ", strides_str(ws), " for shape ",
           shape_str(ws));
    }
    expect *= ws.shape[d];
  }
  if (reinterpret_cast<std::uintptr_t>(ws.data) % 16 != 0) {
    fail("workspace must be 16-byte aligned, got address ", ws.data);
  }
  return std::size_t(ws.numel()) * dtype_size(ws.dtype);
}

void OpCheck::kv_cache(const TensorView& t, const char* name) const {
  ndim(t, name, 4, "[num_blocks, block_size, num_kv_heads, head_dim]");
  if (t.dtype != DType::Float8E4M3FN) attention_dtype(t, name);  // or a float8 cache
  last_dim_contiguous(t, name);
  const std::int64_t block_size = t.shape[1], heads = t.shape[2], head_dim = t.shape[3];
  if (block_size <= 0) fail("block_size must be positive, got ", block_size);
  if (heads <= 0) fail("num_kv_heads must be positive, got ", heads);
  if (head_dim <= 0) fail("head_dim must be positive, got ", head_dim);
  if (block_size > (1 << 20)) fail("block_size must be at most 1048576, got ", block_size);
  // One token's row of every head, in bytes, is indexed with 32-bit integers.
  constexpr std::int64_t kMaxTokenBytes = std::numeric_limits<std::int32_t>::max();
  if (heads > kMaxTokenBytes || head_dim > kMaxTokenBytes ||
      heads * head_dim > kMaxTokenBytes / std::int64_t(dtype_size(t.dtype))) {
    fail(name, " must hold at most ", kMaxTokenBytes,
         " bytes per token (num_kv_heads * head_dim * element size), got num_kv_heads ", heads,
         " and head_dim ", head_dim);
  }
  distinct_elements(t, name);
}

void OpCheck::disjoint(const Named& a, const Named& b) const {
  if (may_overlap(a.t, b.t)) {
    fail(a.name, " and ", b.name, " must not share memory, got overlapping views at ", a.t.data,
         " and ", b.t.data);
  }
}

Device OpCheck::same_device(std::initializer_list<Named> tensors) const {
  const Named* first = nullptr;
  for (const Named& n : tensors) {
    if (first == nullptr) {
      first = &n;
      continue;
    }
    Device a = first->t.device, b = n.t.device;
    bool same = is_host(a) ? is_host(b) : (b.type == DeviceType::CUDA && a.index == b.index);
    if (!same) {
      fail("all tensors must be on one device: ", first->name, " is on ", device_str(a), ", got ",
           n.name, " on ", device_str(b));
    }
  }
  return first ? first->t.device : Device{};
}

Backend OpCheck::backend(Device device) const {
  if (is_host(device)) return Backend::CPU;
  if (!kernels::cuda::compiled()) {
    fail_runtime(op_, "tinyserve was built without CUDA, got tensors on ", device_str(device));
  }
  int count = kernels::cuda::device_count();
  if (device.index < 0 || device.index >= count) {
    fail_runtime(op_, "tensors must be on one of the ", count,
                 " visible CUDA device(s), got tensors on ", device_str(device));
  }
  return Backend::CUDA;
}

}  // namespace tinyserve::detail
