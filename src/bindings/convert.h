#pragma once

// nb::ndarray -> TensorView. Only metadata is read, so views can be made and used with the GIL
// released.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <stdexcept>
#include <string>

#include "tinyserve/tensor.h"

namespace tinyserve::bindings {

namespace nb = nanobind;

template <class... Ts>
TensorView to_view(const nb::ndarray<Ts...>& a, const char* op, const char* name) {
  auto bad = [&](const std::string& what) {
    return std::invalid_argument(std::string("tinyserve.") + op + ": " + name + " " + what);
  };
  TensorView t;
  const nb::dlpack::dtype dt = a.dtype();
  const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
  if (dt.lanes != 1) throw bad("must have one lane per element, got " + std::to_string(dt.lanes));
  if (code == nb::dlpack::dtype_code::Float && dt.bits == 32) {
    t.dtype = DType::Float32;
  } else if (code == nb::dlpack::dtype_code::Float && dt.bits == 16) {
    t.dtype = DType::Float16;
  } else if (code == nb::dlpack::dtype_code::Bfloat && dt.bits == 16) {
    t.dtype = DType::BFloat16;
  } else if (code == nb::dlpack::dtype_code::Int && dt.bits == 32) {
    t.dtype = DType::Int32;
  } else if (code == nb::dlpack::dtype_code::Int && dt.bits == 64) {
    t.dtype = DType::Int64;
  } else if (code == nb::dlpack::dtype_code::UInt && dt.bits == 8) {
    t.dtype = DType::UInt8;
  } else if (code == nb::dlpack::dtype_code::Float8_E4M3FN && dt.bits == 8) {
    t.dtype = DType::Float8E4M3;
  } else {
    throw bad("has an unsupported dtype (code " + std::to_string(int(dt.code)) + ", " +
              std::to_string(dt.bits) +
              " bits); expected float32, float16, bfloat16, int32, "
              "int64, uint8 or float8_e4m3fn");
  }
  switch (a.device_type()) {
    case nb::device::cpu::value:
      t.device = {DeviceType::CPU, 0};
      break;
    case nb::device::cuda::value:
    case nb::device::cuda_managed::value:
      t.device = {DeviceType::CUDA, int(a.device_id())};
      break;
    case nb::device::cuda_host::value:
      t.device = {DeviceType::CUDAHost, int(a.device_id())};
      break;
    default:
      throw bad("is on an unsupported device (DLPack device type " +
                std::to_string(a.device_type()) + "); expected cpu, cuda or cuda_host");
  }
  if (a.ndim() > std::size_t(kMaxDims)) {
    throw bad("must have at most " + std::to_string(kMaxDims) + " dimensions, got " +
              std::to_string(a.ndim()));
  }
  t.ndim = int(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = std::int64_t(a.shape(std::size_t(i)));
    t.strides[i] = std::int64_t(a.stride(std::size_t(i)));
  }
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  return t;
}

}  // namespace tinyserve::bindings
