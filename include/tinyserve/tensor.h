#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "tinyserve/export.h"

namespace tinyserve {

// Element types. The attention ops compute in float32, float16 and bfloat16; the block copies
// move bytes and take any of them. New members are appended (the values are ABI).
enum class DType : std::int8_t {
  Float32,
  Float16,
  BFloat16,
  Int32,
  Int64,
  UInt8,
  Float64,
  Int8,
  Int16,
  UInt16,
  UInt32,
  UInt64,
  Bool,
  Float8E4M3FN,
  Float8E5M2,
  Float8E4M3FNUZ,
  Float8E5M2FNUZ,
  Float8E8M0FNU,
  Complex64,
  Complex128,
};

// Where a tensor's memory lives. CUDAHost is page-locked host memory that the device can reach.
enum class DeviceType : std::int8_t { CPU, CUDA, CUDAHost };

struct Device {
  DeviceType type = DeviceType::CPU;
  int index = 0;
};

inline bool operator==(Device a, Device b) { return a.type == b.type && a.index == b.index; }
inline bool operator!=(Device a, Device b) { return !(a == b); }

// A CUDA stream passed as an integer (a cudaStream_t value), so that no public header needs CUDA.
// 0 is the legacy default stream.
using Stream = std::uintptr_t;

inline constexpr int kMaxDims = 6;

// A non-owning view of a strided tensor: the currency of every op. Strides count elements, not
// bytes. tinyserve never takes ownership of the memory behind a view.
struct TensorView {
  void* data = nullptr;
  DType dtype = DType::Float32;
  Device device{};
  int ndim = 0;
  std::int64_t shape[kMaxDims] = {};
  std::int64_t strides[kMaxDims] = {};

  std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  template <class T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

TINYSERVE_API std::size_t dtype_size(DType dtype);
TINYSERVE_API const char* dtype_name(DType dtype);
TINYSERVE_API const char* device_name(DeviceType type);

// Builds a view; with `strides` empty the view is C-contiguous.
TINYSERVE_API TensorView make_tensor(void* data, DType dtype, Device device,
                                     std::initializer_list<std::int64_t> shape,
                                     std::initializer_list<std::int64_t> strides = {});

// Returns the view with dimensions `a` and `b` swapped (a permuted view, no copy): the way an
// HND cache [blocks, heads, block_size, head_dim] is passed as the logical NHD shape.
TINYSERVE_API TensorView transpose(const TensorView& t, int a, int b);

}  // namespace tinyserve
