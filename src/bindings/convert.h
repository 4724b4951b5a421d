#pragma once

// nb::ndarray -> TensorView. Only metadata is read, so views can be made and used with the GIL
// released.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

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
  } else {
    throw bad("has an unsupported dtype (code " + std::to_string(int(dt.code)) + ", " +
              std::to_string(dt.bits) +
              " bits); expected float32, float16, bfloat16, int32, "
              "int64 or uint8");
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

// ---- integer arguments of host-side classes (BlockManager, Compactor) ----------------------
// `where` is the method's prefix, e.g. "BlockManager.append": errors read
// "tinyserve.BlockManager.append: <name> ..., got <value>".

inline std::string arg_error(const char* where, const std::string& name, const std::string& what) {
  return std::string("tinyserve.") + where + ": " + name + " " + what;
}

// A DLPack dtype by its usual name (int32, float64, ...), for messages.
inline std::string dlpack_dtype_str(const nb::dlpack::dtype& dt) {
  std::string base;
  switch (static_cast<nb::dlpack::dtype_code>(dt.code)) {
    case nb::dlpack::dtype_code::Int:
      base = "int";
      break;
    case nb::dlpack::dtype_code::UInt:
      base = "uint";
      break;
    case nb::dlpack::dtype_code::Float:
      base = "float";
      break;
    case nb::dlpack::dtype_code::Bfloat:
      base = "bfloat";
      break;
    case nb::dlpack::dtype_code::Bool:
      return "bool";
    case nb::dlpack::dtype_code::Complex:
      base = "complex";
      break;
    default:
      return "dtype code " + std::to_string(int(dt.code)) + " with " + std::to_string(dt.bits) +
             " bits";
  }
  return base + std::to_string(dt.bits) + (dt.lanes != 1 ? "x" + std::to_string(dt.lanes) : "");
}

// A Python integer (or anything with __index__) as int64; anything else, or a value out of
// range, raises naming the argument and the value.
inline std::int64_t to_int64(nb::handle h, const char* where, const std::string& name) {
  if (!PyLong_Check(h.ptr()) && !PyIndex_Check(h.ptr())) {
    throw nb::type_error(
        arg_error(where, name, "must be an int, got " + std::string(nb::inst_name(h).c_str()))
            .c_str());
  }
  nb::object index = nb::steal(PyNumber_Index(h.ptr()));
  if (!index.is_valid()) throw nb::python_error();
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) {
    throw std::invalid_argument(
        arg_error(where, name, "must fit in int64, got " + std::string(nb::str(index).c_str())));
  }
  if (v == -1 && PyErr_Occurred()) throw nb::python_error();
  return std::int64_t(v);
}

// A 1-D int64 view of an argument: a sequence of Python ints, or any 1-D integer array on the
// CPU (NumPy, any DLPack or buffer-protocol producer). A C-contiguous int64 array is borrowed;
// anything else is converted into an owned vector. Errors name the argument, the element and
// its value.
class Int64Arg {
 public:
  Int64Arg(nb::handle h, const char* where, const char* name) {
    nb::ndarray<nb::ro> array;
    if (nb::try_cast(h, array, /*convert=*/false)) {
      from_array(array, where, name);
    } else if (nb::isinstance<nb::sequence>(h) && !nb::isinstance<nb::str>(h) &&
               !nb::isinstance<nb::bytes>(h)) {
      const nb::sequence seq = nb::borrow<nb::sequence>(h);
      const std::size_t n = nb::len(seq);
      owned_.reserve(n);
      for (std::size_t i = 0; i < n; ++i) {
        owned_.push_back(
            to_int64(seq[i], where, std::string(name) + "[" + std::to_string(i) + "]"));
      }
      data_ = owned_.data();
      size_ = owned_.size();
    } else {
      throw nb::type_error(arg_error(where, name,
                                     "must be a list of ints or a 1-D integer array, got " +
                                         std::string(nb::inst_name(h).c_str()))
                               .c_str());
    }
  }

  const std::int64_t* data() const { return data_; }
  std::int64_t size() const { return std::int64_t(size_); }

 private:
  void from_array(const nb::ndarray<nb::ro>& a, const char* where, const char* name) {
    auto bad = [&](const std::string& what) {
      return std::invalid_argument(arg_error(where, name, what));
    };
    if (a.device_type() != nb::device::cpu::value) throw bad("must be on the CPU");
    if (a.ndim() != 1) throw bad("must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
    const nb::dlpack::dtype dt = a.dtype();
    const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
    const bool is_signed = code == nb::dlpack::dtype_code::Int;
    if ((!is_signed && code != nb::dlpack::dtype_code::UInt) || dt.lanes != 1 ||
        (dt.bits != 8 && dt.bits != 16 && dt.bits != 32 && dt.bits != 64)) {
      throw nb::type_error(
          arg_error(where, name, "must hold integers, got " + dlpack_dtype_str(dt)).c_str());
    }
    size_ = a.shape(0);
    const std::int64_t stride = a.stride(0);
    const auto* bytes = static_cast<const std::uint8_t*>(a.data());
    if (is_signed && dt.bits == 64 && (stride == 1 || size_ <= 1)) {
      array_ = a;  // keeps the memory alive
      data_ = static_cast<const std::int64_t*>(a.data());
      return;
    }
    owned_.resize(size_);
    const std::int64_t step = stride * (dt.bits / 8);
    for (std::size_t i = 0; i < size_; ++i) {
      const std::uint8_t* p = bytes + std::int64_t(i) * step;
      owned_[i] = is_signed
                      ? load<std::int8_t, std::int16_t, std::int32_t, std::int64_t>(p, dt.bits)
                      : load_unsigned(p, dt.bits, where, name, i);
    }
    data_ = owned_.data();
  }

  // memcpy: a strided view need not be aligned.
  template <class T>
  static T load_as(const std::uint8_t* p) {
    T v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }

  template <class T8, class T16, class T32, class T64>
  static std::int64_t load(const std::uint8_t* p, int bits) {
    if (bits == 8) return load_as<T8>(p);
    if (bits == 16) return load_as<T16>(p);
    if (bits == 32) return load_as<T32>(p);
    return std::int64_t(load_as<T64>(p));
  }

  static std::int64_t load_unsigned(const std::uint8_t* p, int bits, const char* where,
                                    const char* name, std::size_t i) {
    const std::uint64_t v =
        std::uint64_t(load<std::uint8_t, std::uint16_t, std::uint32_t, std::uint64_t>(p, bits));
    if (bits == 64 && v > std::uint64_t(std::numeric_limits<std::int64_t>::max())) {
      throw std::invalid_argument(arg_error(where,
                                            std::string(name) + "[" + std::to_string(i) + "]",
                                            "must fit in int64, got " + std::to_string(v)));
    }
    return std::int64_t(v);
  }

  nb::ndarray<nb::ro> array_;
  std::vector<std::int64_t> owned_;
  const std::int64_t* data_ = nullptr;
  std::size_t size_ = 0;
};

// Hands a vector's buffer to NumPy without a copy: the array owns the vector. Strides in
// elements; none means C order.
template <class T>
nb::ndarray<nb::numpy, T> to_numpy(std::vector<T>&& v, std::initializer_list<std::size_t> shape,
                                   std::initializer_list<std::int64_t> strides = {}) {
  auto* owned = new std::vector<T>(std::move(v));
  nb::capsule owner(owned, [](void* p) noexcept { delete static_cast<std::vector<T>*>(p); });
  return nb::ndarray<nb::numpy, T>(owned->data(), shape, owner, strides);
}

}  // namespace tinyserve::bindings
