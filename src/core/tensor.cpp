#include "tinyserve/tensor.h"

#include "core/validate.h"

namespace tinyserve {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Complex128:
      return 16;
    case DType::Complex64:
    case DType::Float64:
    case DType::Int64:
    case DType::UInt64:
      return 8;
    case DType::Float32:
    case DType::Int32:
    case DType::UInt32:
      return 4;
    case DType::Float16:
    case DType::BFloat16:
    case DType::Int16:
    case DType::UInt16:
      return 2;
    case DType::UInt8:
    case DType::Int8:
    case DType::Bool:
    case DType::Float8E4M3FN:
    case DType::Float8E5M2:
    case DType::Float8E4M3FNUZ:
    case DType::Float8E5M2FNUZ:
    case DType::Float8E8M0FNU:
      return 1;
  }
  return 0;
}

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return "float32";
    case DType::Float16:
      return "float16";
    case DType::BFloat16:
      return "bfloat16";
    case DType::Int32:
      return "int32";
    case DType::Int64:
      return "int64";
    case DType::UInt8:
      return "uint8";
    case DType::Float64:
      return "float64";
    case DType::Int8:
      return "int8";
    case DType::Int16:
      return "int16";
    case DType::UInt16:
      return "uint16";
    case DType::UInt32:
      return "uint32";
    case DType::UInt64:
      return "uint64";
    case DType::Bool:
      return "bool";
    case DType::Float8E4M3FN:
      return "float8_e4m3fn";
    case DType::Float8E5M2:
      return "float8_e5m2";
    case DType::Float8E4M3FNUZ:
      return "float8_e4m3fnuz";
    case DType::Float8E5M2FNUZ:
      return "float8_e5m2fnuz";
    case DType::Float8E8M0FNU:
      return "float8_e8m0fnu";
    case DType::Complex64:
      return "complex64";
    case DType::Complex128:
      return "complex128";
  }
  return "unknown";
}

const char* device_name(DeviceType type) {
  switch (type) {
    case DeviceType::CPU:
      return "cpu";
    case DeviceType::CUDA:
      return "cuda";
    case DeviceType::CUDAHost:
      return "cuda_host";
  }
  return "unknown";
}

TensorView make_tensor(void* data, DType dtype, Device device,
                       std::initializer_list<std::int64_t> shape,
                       std::initializer_list<std::int64_t> strides) {
  if (shape.size() > static_cast<std::size_t>(kMaxDims)) {
    detail::fail("make_tensor", "at most ", kMaxDims, " dimensions, got ", shape.size());
  }
  if (strides.size() != 0 && strides.size() != shape.size()) {
    detail::fail("make_tensor", "strides must match the shape's rank, got ", strides.size(),
                 " strides for ", shape.size(), " dimensions");
  }
  TensorView t;
  t.data = data;
  t.dtype = dtype;
  t.device = device;
  t.ndim = static_cast<int>(shape.size());
  int i = 0;
  for (std::int64_t s : shape) t.shape[i++] = s;
  if (strides.size() == 0) {
    std::int64_t stride = 1;
    for (int d = t.ndim - 1; d >= 0; --d) {
      t.strides[d] = stride;
      stride *= t.shape[d];
    }
  } else {
    i = 0;
    for (std::int64_t s : strides) t.strides[i++] = s;
  }
  return t;
}

TensorView transpose(const TensorView& t, int a, int b) {
  if (a < 0 || a >= t.ndim || b < 0 || b >= t.ndim) {
    detail::fail("transpose", "dimensions out of range for a tensor of ", t.ndim,
                 " dimensions, got ", a, " and ", b);
  }
  TensorView r = t;
  std::swap(r.shape[a], r.shape[b]);
  std::swap(r.strides[a], r.strides[b]);
  return r;
}

}  // namespace tinyserve
