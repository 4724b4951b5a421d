#include "core/validate.h"

#include "core/kernels.h"

namespace tinyserve::detail {

std::string shape_str(const TensorView& t) {
  std::string s = "[";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
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

void OpCheck::writable(const TensorView& t, const char* name) const {
  last_dim_contiguous(t, name);
  if (t.numel() == 0) return;
  for (int i = 0; i < t.ndim; ++i) {
    if (t.shape[i] > 1 && t.strides[i] == 0) {
      fail(name, " is written to and must not repeat elements, got stride 0 in dimension ", i);
    }
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
    fail_runtime(op_, "tensors are on ", device_str(device),
                 " but tinyserve was built without CUDA");
  }
  int count = kernels::cuda::device_count();
  if (device.index < 0 || device.index >= count) {
    fail_runtime(op_, "tensors are on ", device_str(device), " but ", count,
                 " CUDA device(s) are available");
  }
  return Backend::CUDA;
}

}  // namespace tinyserve::detail
