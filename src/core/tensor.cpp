#include "tinyserve/tensor.h"

#include <stdexcept>
#include <string>

namespace tinyserve {

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::Float32:
      return 4;
    case DType::Float16:
      return 2;
    case DType::BFloat16:
      return 2;
    case DType::Int32:
      return 4;
    case DType::Int64:
      return 8;
    case DType::UInt8:
      return 1;
    case DType::Float8E4M3:
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
    case DType::Float8E4M3:
      return "float8_e4m3fn";
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
    throw std::invalid_argument("tinyserve.make_tensor: at most " + std::to_string(kMaxDims) +
                                " dimensions, got " + std::to_string(shape.size()));
  }
  if (strides.size() != 0 && strides.size() != shape.size()) {
    throw std::invalid_argument("tinyserve.make_tensor: strides must match the shape's rank, got " +
                                std::to_string(strides.size()) + " strides for " +
                                std::to_string(shape.size()) + " dimensions");
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
    throw std::invalid_argument("tinyserve.transpose: dimensions out of range for a tensor of " +
                                std::to_string(t.ndim) + " dimensions, got " + std::to_string(a) +
                                " and " + std::to_string(b));
  }
  TensorView r = t;
  std::swap(r.shape[a], r.shape[b]);
  std::swap(r.strides[a], r.strides[b]);
  return r;
}

}  // namespace tinyserve
