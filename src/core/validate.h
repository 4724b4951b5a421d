#pragma once

// The one validation layer every op goes through. Messages follow one style:
//   tinyserve.<op>: <what is wrong>, got <value>
// Bad arguments throw std::invalid_argument (Python ValueError); a missing backend or device
// throws std::runtime_error.

#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

#include "tinyserve/tensor.h"

namespace tinyserve::detail {

template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(const char* op, Args&&... args) {
  throw std::invalid_argument(concat("tinyserve.", op, ": ", std::forward<Args>(args)...));
}

template <class... Args>
[[noreturn]] void fail_runtime(const char* op, Args&&... args) {
  throw std::runtime_error(concat("tinyserve.", op, ": ", std::forward<Args>(args)...));
}

std::string shape_str(const TensorView& t);
std::string device_str(Device d);

enum class Backend { CPU, CUDA };

inline bool is_host(Device d) { return d.type != DeviceType::CUDA; }

struct Named {
  const TensorView& t;
  const char* name;
};

class OpCheck {
 public:
  explicit OpCheck(const char* op) : op_(op) {}
  const char* op() const { return op_; }

  template <class... Args>
  [[noreturn]] void fail(Args&&... args) const {
    detail::fail(op_, std::forward<Args>(args)...);
  }
  template <class... Args>
  void require(bool ok, Args&&... args) const {
    if (!ok) detail::fail(op_, std::forward<Args>(args)...);
  }

  // A tensor that must exist (non-null data unless it has no elements), with `n` dimensions
  // whose meaning `dims` spells out, e.g. "[batch, num_q_heads, head_dim]".
  void ndim(const TensorView& t, const char* name, int n, const char* dims) const;
  void dtype(const TensorView& t, const char* name, DType expected) const;
  void attention_dtype(const TensorView& t, const char* name) const;  // float32/16, bfloat16
  void same_dtype(const TensorView& a, const char* an, const TensorView& b,
                  const char* bn) const;
  void dim(const TensorView& t, const char* name, int d, std::int64_t expected,
           const char* what) const;
  void last_dim_contiguous(const TensorView& t, const char* name) const;
  // An output: last dimension contiguous, and no two elements at one address through a zero
  // stride.
  void writable(const TensorView& t, const char* name) const;
  // All tensors on one device; host memory (cpu, cuda_host) counts as one device. Returns it.
  Device same_device(std::initializer_list<Named> tensors) const;
  // Throws std::runtime_error when the backend for `device` is not available.
  Backend backend(Device device) const;

 private:
  const char* op_;
};

}  // namespace tinyserve::detail
