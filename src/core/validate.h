#pragma once

// The one validation layer every op goes through. Messages follow one style:
//   tinyserve.<op>: <what is wrong>, got <value>
// Bad arguments throw std::invalid_argument (Python ValueError); a missing backend or device
// throws std::runtime_error.
//
// Messages are built only when a check fails (TS_REQUIRE), and without iostreams: the library
// may be loaded into processes whose C++ runtime differs from the one it was built with, and
// stream formatting is where such mixtures break.

#include <cstdio>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

#include "tinyserve/tensor.h"

// Checks `cond`; only when it fails are the message parts evaluated and the error thrown.
#define TS_REQUIRE(check, cond, ...)        \
  do {                                      \
    if (!(cond)) (check).fail(__VA_ARGS__); \
  } while (0)

namespace tinyserve::detail {

inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, char v) { s += v; }
template <class T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, char> &&
                                        !std::is_same_v<T, bool>,
                                    int> = 0>
void append(std::string& s, T v) {
  s += std::to_string(v);
}
inline void append(std::string& s, double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", v);
  s += buf;
}
inline void append(std::string& s, const void* v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", v);
  s += buf;
}

template <class... Args>
std::string concat(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}

template <class... Args>
[[noreturn]] void fail(const char* op, const Args&... args) {
  throw std::invalid_argument(concat("tinyserve.", op, ": ", args...));
}

template <class... Args>
[[noreturn]] void fail_runtime(const char* op, const Args&... args) {
  throw std::runtime_error(concat("tinyserve.", op, ": ", args...));
}

// "name[i]" in a fixed buffer: names of list items are made on every call and read only when a
// check fails, so they are built without an allocation.
struct IndexedName {
  char text[48];
  IndexedName(const char* list, std::size_t index) {
    char digits[24];
    int n = 0;
    do {
      digits[n++] = char('0' + index % 10);
      index /= 10;
    } while (index > 0);
    std::size_t len = 0;
    for (const char* c = list; *c && len < sizeof(text) - 24; ++c) text[len++] = *c;
    text[len++] = '[';
    while (n > 0) text[len++] = digits[--n];
    text[len++] = ']';
    text[len] = '\0';
  }
};

std::string shape_str(const TensorView& t);
std::string strides_str(const TensorView& t);

// True when no two index tuples of `t` reach one address. Checked in the sufficient form that
// every regular layout meets: with the dimensions ordered by |stride|, each |stride| exceeds
// the span of all smaller ones.
bool non_overlapping(const TensorView& t);
// The bytes [first, last) that a non-empty tensor's elements lie in.
std::pair<std::uintptr_t, std::uintptr_t> byte_range(const TensorView& t);
// Whether two tensors may share an element's memory: exact for views that step alike (the same
// element size, rank and strides, shapes free: K and V in one [N, 2, ...] tensor, two layers of a
// [L, ...] tensor, column slices of different widths of one buffer), otherwise by address ranges.
bool may_overlap(const TensorView& a, const TensorView& b);
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
  [[noreturn]] void fail(const Args&... args) const {
    detail::fail(op_, args...);
  }

  // A tensor that must exist (non-null data unless it has no elements), with `n` dimensions
  // whose meaning `dims` spells out, e.g. "[batch, num_q_heads, head_dim]".
  void ndim(const TensorView& t, const char* name, int n, const char* dims) const;
  void dtype(const TensorView& t, const char* name, DType expected) const;
  void attention_dtype(const TensorView& t, const char* name) const;  // float32/16, bfloat16
  void same_dtype(const TensorView& a, const char* an, const TensorView& b, const char* bn) const;
  void dim(const TensorView& t, const char* name, int d, std::int64_t expected,
           const char* what) const;
  void last_dim_contiguous(const TensorView& t, const char* name) const;
  // No two elements at one address (see non_overlapping).
  void distinct_elements(const TensorView& t, const char* name) const;
  // An output: last dimension contiguous and distinct elements.
  void writable(const TensorView& t, const char* name) const;
  // A KV cache argument, read or written: [num_blocks, block_size, num_kv_heads, head_dim], an
  // attention dtype, rows of head_dim contiguous and no two elements at one address (rows that
  // overlap, or one row twice, cannot hold different tokens), sizes that the kernels' 32-bit
  // indices hold.
  void kv_cache(const TensorView& t, const char* name) const;
  // A caller's scratch buffer, which the kernels use as one run of bytes from its start:
  // contiguous and 16-byte aligned. Returns its size in bytes.
  std::size_t workspace(const TensorView& ws) const;
  // `a` and `b` share no memory (where the layouts differ, their address ranges must not
  // intersect).
  void disjoint(const Named& a, const Named& b) const;
  // All tensors on one device; host memory (cpu, cuda_host) counts as one device. Returns it.
  Device same_device(std::initializer_list<Named> tensors) const;
  // Throws std::runtime_error when the backend for `device` is not available.
  Backend backend(Device device) const;

 private:
  const char* op_;
};

}  // namespace tinyserve::detail
