#pragma once

// Python objects -> core arguments: arrays to TensorViews, Python ints and floats to the core's
// fixed-width types. Every conversion that fails names the op, the argument and the value it got:
// TypeError when the object is not of the kind asked for (a list where an array goes), ValueError
// when it is but its value cannot be used (a read-only output, float64, an int out of range).
// Only metadata is read, so the views can be used with the GIL released.

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/validate.h"
#include "tinyserve/tensor.h"

namespace tinyserve::bindings {

namespace nb = nanobind;

// tinyserve.ArgumentTypeError, a subclass of both TypeError and ValueError (module.cpp makes it).
PyObject* argument_type_error();

// An argument of the wrong kind (a list where an array goes): a TypeError by Python's habit, and
// a ValueError as the contract calls every bad argument, so that either `except` catches it.
template <class... Args>
[[noreturn]] void type_error(const char* op, const Args&... args) {
  PyErr_SetString(argument_type_error(), detail::concat("tinyserve.", op, ": ", args...).c_str());
  throw nb::python_error();
}

// How a value shows in a message: ints and floats as Python prints them, anything else by type.
inline std::string describe(nb::handle h) {
  if (PyLong_Check(h.ptr()) || PyFloat_Check(h.ptr())) return nb::repr(h).c_str();
  return nb::inst_name(h).c_str();
}

// The DLPack element type as a DType; nullopt for types the core has no name for.
inline std::optional<DType> dlpack_dtype(nb::dlpack::dtype dt) {
  using Code = nb::dlpack::dtype_code;
  if (dt.lanes != 1) return std::nullopt;
  const int bits = dt.bits;
  switch (static_cast<Code>(dt.code)) {
    case Code::Float:
      if (bits == 32) return DType::Float32;
      if (bits == 16) return DType::Float16;
      if (bits == 64) return DType::Float64;
      break;
    case Code::Bfloat:
      if (bits == 16) return DType::BFloat16;
      break;
    case Code::Int:
      if (bits == 32) return DType::Int32;
      if (bits == 64) return DType::Int64;
      if (bits == 8) return DType::Int8;
      if (bits == 16) return DType::Int16;
      break;
    case Code::UInt:
      if (bits == 8) return DType::UInt8;
      if (bits == 16) return DType::UInt16;
      if (bits == 32) return DType::UInt32;
      if (bits == 64) return DType::UInt64;
      break;
    case Code::Bool:
      if (bits == 8) return DType::Bool;
      break;
    case Code::Complex:
      if (bits == 64) return DType::Complex64;
      if (bits == 128) return DType::Complex128;
      break;
    case Code::Float8_E4M3FN:
      if (bits == 8) return DType::Float8E4M3FN;
      break;
    case Code::Float8_E5M2:
      if (bits == 8) return DType::Float8E5M2;
      break;
    case Code::Float8_E4M3FNUZ:
      if (bits == 8) return DType::Float8E4M3FNUZ;
      break;
    case Code::Float8_E5M2FNUZ:
      if (bits == 8) return DType::Float8E5M2FNUZ;
      break;
    case Code::Float8_E8M0FNU:
      if (bits == 8) return DType::Float8E8M0FNU;
      break;
    default:
      break;
  }
  return std::nullopt;
}

// A readable name for a DLPack element type the core cannot take.
inline std::string dlpack_dtype_name(nb::dlpack::dtype dt) {
  static const char* const kinds[] = {"int",
                                      "uint",
                                      "float",
                                      "opaque handle",
                                      "bfloat",
                                      "complex",
                                      "bool",
                                      "float8_e3m4",
                                      "float8_e4m3",
                                      "float8_e4m3b11fnuz",
                                      "float8_e4m3fn",
                                      "float8_e4m3fnuz",
                                      "float8_e5m2",
                                      "float8_e5m2fnuz",
                                      "float8_e8m0fnu",
                                      "float6_e2m3fn",
                                      "float6_e3m2fn",
                                      "float4_e2m1fn",
                                      "bcomplex"};
  std::string name;
  if (dt.code < std::size(kinds)) {
    name = kinds[dt.code];
    const bool sized = dt.code <= 5 || dt.code == 18 || (dt.code == 6 && dt.bits != 8);
    if (sized) name = detail::concat(name, int(dt.bits));
  } else {
    name = detail::concat("DLPack dtype code ", int(dt.code), " of ", int(dt.bits), " bits");
  }
  if (dt.lanes != 1) name = detail::concat(name, " with ", int(dt.lanes), " lanes");
  return name;
}

template <class... Ts>
TensorView to_view(const nb::ndarray<Ts...>& a, const char* op, const char* name) {
  TensorView t;
  const nb::dlpack::dtype dt = a.dtype();
  const std::optional<DType> dtype = dlpack_dtype(dt);
  if (!dtype) detail::fail(op, name, " has an unsupported dtype, got ", dlpack_dtype_name(dt));
  t.dtype = *dtype;
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
      detail::fail(op, name, " must be on cpu, cuda or cuda_host, got DLPack device type ",
                   a.device_type());
  }
  if (a.ndim() > std::size_t(kMaxDims)) {
    detail::fail(op, name, " must have at most ", kMaxDims, " dimensions, got ", a.ndim());
  }
  t.ndim = int(a.ndim());
  for (int i = 0; i < t.ndim; ++i) {
    t.shape[i] = std::int64_t(a.shape(std::size_t(i)));
    t.strides[i] = std::int64_t(a.stride(std::size_t(i)));
  }
  t.data = const_cast<void*>(static_cast<const void*>(a.data()));
  return t;
}

// The arrays of one call: converts them and keeps each imported array alive until the call
// returns.
class Arrays {
 public:
  explicit Arrays(const char* op) : op_(op) {}

  // Read, never written: read-only arrays are fine.
  TensorView input(nb::handle h, const char* name) {
    nb::ndarray<nb::ro> a;
    if (!nb::try_cast(h, a, /*convert=*/false)) not_an_array(h, name);
    TensorView t = to_view(a, op_, name);
    inputs_.keep(std::move(a));
    return t;
  }

  std::optional<TensorView> optional_input(nb::handle h, const char* name) {
    if (h.is_none()) return std::nullopt;
    return input(h, name);
  }

  // Written to: must be writable.
  TensorView output(nb::handle h, const char* name) {
    nb::ndarray<> a;
    if (!nb::try_cast(h, a, /*convert=*/false)) {
      nb::ndarray<nb::ro> read_only;
      if (nb::try_cast(h, read_only, /*convert=*/false)) {
        detail::fail(op_, name, " is written to and must be writable, got a read-only ",
                     nb::inst_name(h).c_str());
      }
      not_an_array(h, name);
    }
    TensorView t = to_view(a, op_, name);
    outputs_.keep(std::move(a));
    return t;
  }

  std::optional<TensorView> optional_output(nb::handle h, const char* name) {
    if (h.is_none()) return std::nullopt;
    return output(h, name);
  }

  // A list or tuple of outputs, named name[0], name[1], ... One array alone is refused rather
  // than iterated over (its rows are not the tensors meant).
  std::vector<TensorView> output_list(nb::handle h, const char* name) {
    if (!PyList_Check(h.ptr()) && !PyTuple_Check(h.ptr())) {
      type_error(op_, name, " must be a list or tuple of arrays, got ", nb::inst_name(h).c_str());
    }
    nb::sequence seq = nb::borrow<nb::sequence>(h);
    const std::size_t n = nb::len(seq);
    std::vector<TensorView> views;
    views.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      views.push_back(output(seq[i], detail::IndexedName(name, i).text));
    }
    return views;
  }

 private:
  [[noreturn]] void not_an_array(nb::handle h, const char* name) const {
    // An array on a device that DLPack cannot name (torch's "meta") says where it is.
    const nb::object device_of = nb::getattr(h, "__dlpack_device__", nb::none());
    if (!device_of.is_none()) {
      bool named = true;
      try {
        device_of();
      } catch (nb::python_error&) {
        named = false;
      }
      if (!named) {
        const nb::object device = nb::getattr(h, "device", nb::none());
        detail::fail(op_, name, " must be on cpu, cuda or cuda_host, got ",
                     nb::inst_name(h).c_str(), " on ",
                     device.is_none() ? std::string("a device DLPack cannot name")
                                      : std::string(nb::str(device).c_str()));
      }
    }
    // An array of a dtype or byte order that neither protocol carries (NumPy's byte-swapped
    // arrays, object arrays) names its dtype.
    const nb::object dtype = nb::getattr(h, "dtype", nb::none());
    if (!dtype.is_none()) {
      const nb::object order = nb::getattr(dtype, "byteorder", nb::none());
      const bool swapped =
          nb::isinstance<nb::str>(order) && std::string(nb::str(order).c_str()) == ">";
      type_error(op_, name,
                 swapped ? " must be in native byte order, got "
                         : " must be an array of a supported dtype, got ",
                 nb::inst_name(h).c_str(), " of dtype ", nb::str(dtype).c_str());
    }
    type_error(op_, name, " must be an array (DLPack or buffer protocol), got ",
               nb::inst_name(h).c_str());
  }

  // The arrays of a call, without an allocation for the usual handful.
  template <class Array>
  class Kept {
   public:
    void keep(Array&& a) {
      if (count_ < kInline) {
        inline_[count_++] = std::move(a);
      } else {
        more_.push_back(std::move(a));
      }
    }

   private:
    static constexpr std::size_t kInline = 8;
    Array inline_[kInline];
    std::size_t count_ = 0;
    std::vector<Array> more_;
  };

  const char* op_;
  Kept<nb::ndarray<nb::ro>> inputs_;
  Kept<nb::ndarray<>> outputs_;
};

// A bool, or an array scalar of a bool dtype (a 0-d torch.bool tensor indexes as 0 or 1).
inline bool is_bool_like(nb::handle h) {
  if (PyBool_Check(h.ptr())) return true;
  if (PyLong_CheckExact(h.ptr()) || !nb::hasattr(h, "dtype")) return false;
  const nb::object dtype = h.attr("dtype");
  const nb::object name = nb::steal(PyObject_Str(dtype.ptr()));
  const char* text = name.is_valid() ? PyUnicode_AsUTF8(name.ptr()) : nullptr;
  if (text == nullptr) {
    PyErr_Clear();
    return false;
  }
  const std::string_view view(text);
  return view == "bool" || view == "torch.bool";
}

// An integer (a Python int, or anything with __index__ but a bool) that fits int64, or nothing:
// for the questions that answer False rather than raise (`x in manager`).
inline std::optional<std::int64_t> as_int64(nb::handle h) {
  if (is_bool_like(h)) return std::nullopt;
  nb::object index = nb::steal(PyNumber_Index(h.ptr()));
  if (!index.is_valid()) {
    PyErr_Clear();
    return std::nullopt;
  }
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0) return std::nullopt;
  return std::int64_t(v);
}

// A Python int (or anything with __index__ but a bool) as T; out of T's range is a ValueError
// naming the argument and the value as given.
template <class T>
T to_int(nb::handle h, const char* op, const char* name) {
  // True and False (and bool tensors) index as 1 and 0; an int argument given a bool is a
  // mistake.
  if (is_bool_like(h)) type_error(op, name, " must be an int, got bool");
  PyObject* index = PyNumber_Index(h.ptr());
  if (index == nullptr) {
    PyErr_Clear();
    type_error(op, name, " must be an int, got ", nb::inst_name(h).c_str());
  }
  nb::object value = nb::steal(index);
  bool in_range;
  T result{};
  if constexpr (std::is_signed_v<T>) {
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    in_range =
        overflow == 0 && v >= std::numeric_limits<T>::min() && v <= std::numeric_limits<T>::max();
    result = T(v);
  } else {
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    in_range = !PyErr_Occurred() && v <= std::numeric_limits<T>::max();
    PyErr_Clear();
    result = T(v);
  }
  if (!in_range) {
    detail::fail(op, name, " must be an int in [", std::numeric_limits<T>::min(), ", ",
                 std::numeric_limits<T>::max(), "], got ", nb::repr(value).c_str());
  }
  return result;
}

// A Python str; anything else is an ArgumentTypeError naming the argument.
inline std::string to_name(nb::handle h, const char* op, const char* name) {
  if (!nb::isinstance<nb::str>(h)) type_error(op, name, " must be a str, got ", describe(h));
  return nb::cast<std::string>(h);
}

// A Python bool (or NumPy bool); anything else, 0 and 1 included, is a TypeError.
inline bool to_bool(nb::handle h, const char* op, const char* name) {
  bool value = false;
  if (nb::try_cast(h, value, /*convert=*/false)) return value;
  // numpy.bool_ (numpy.bool in NumPy 2) is no Python bool; nanobind's strict cast refuses it.
  const nb::handle type = h.type();
  const auto text_of = [&](const char* attribute) {
    const nb::object v = nb::getattr(type, attribute, nb::none());
    return nb::isinstance<nb::str>(v) ? std::string(nb::borrow<nb::str>(v).c_str()) : "";
  };
  const std::string type_name = text_of("__name__");
  if (text_of("__module__") == "numpy" && (type_name == "bool" || type_name == "bool_")) {
    const int truth = PyObject_IsTrue(h.ptr());
    if (truth >= 0) return truth == 1;
    PyErr_Clear();
  }
  type_error(op, name, " must be a bool, got ", nb::inst_name(h).c_str());
}

// The C++ object behind a bound class instance (`type` names the class in the message); anything
// else, None included, is an ArgumentTypeError naming the argument.
template <class T>
T& instance_of(nb::handle h, const char* op, const char* name, const char* type) {
  T* p = nullptr;
  if (!nb::try_cast(h, p, /*convert=*/false) || p == nullptr) {
    type_error(op, name, " must be a ", type, ", got ", nb::inst_name(h).c_str());
  }
  return *p;
}

// A Python float (or int, or anything with __float__) as float32. A finite value that float32
// cannot hold (it would become inf or 0) is a ValueError with the value as given; inf and nan
// pass through for the op's own checks.
inline float to_float(nb::handle h, const char* op, const char* name) {
  // True and False convert to 1.0 and 0.0; a float argument given a bool is a mistake.
  if (is_bool_like(h)) type_error(op, name, " must be a float, got bool");
  double v = PyFloat_AsDouble(h.ptr());
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    type_error(op, name, " must be a float, got ", nb::inst_name(h).c_str());
  }
  const float f = float(v);
  if (std::isfinite(v) && (std::isinf(f) || (f == 0.0f && v != 0.0))) {
    detail::fail(op, name, " must be representable in float32, got ", describe(h));
  }
  return f;
}

inline std::optional<float> to_optional_float(nb::handle h, const char* op, const char* name) {
  if (h.is_none()) return std::nullopt;
  return to_float(h, op, name);
}

// A 1-D int64 view of an argument of a host-side class (BlockManager, Compactor): a sequence of
// Python ints, or any 1-D integer array on the CPU (NumPy, any DLPack or buffer-protocol
// producer). A contiguous int64 array is borrowed; anything else is converted into an owned
// vector. Errors name the argument, the element and its value.
class Int64Arg {
 public:
  Int64Arg(nb::handle h, const char* op, const char* name) {
    nb::ndarray<nb::ro> array;
    if (nb::try_cast(h, array, /*convert=*/false)) {
      from_array(array, op, name);
    } else if (nb::isinstance<nb::sequence>(h) && !nb::isinstance<nb::str>(h) &&
               !nb::isinstance<nb::bytes>(h)) {
      const nb::sequence seq = nb::borrow<nb::sequence>(h);
      const std::size_t n = nb::len(seq);
      owned_.reserve(n);
      for (std::size_t i = 0; i < n; ++i) {
        owned_.push_back(to_int<std::int64_t>(seq[i], op, detail::IndexedName(name, i).text));
      }
      data_ = owned_.data();
      size_ = owned_.size();
    } else {
      type_error(op, name, " must be a list of ints or a 1-D integer array, got ",
                 nb::inst_name(h).c_str());
    }
  }

  const std::int64_t* data() const { return data_; }
  std::int64_t size() const { return std::int64_t(size_); }

 private:
  void from_array(const nb::ndarray<nb::ro>& a, const char* op, const char* name) {
    if (a.device_type() != nb::device::cpu::value) {
      detail::fail(op, name, " must be on the CPU, got DLPack device type ", a.device_type());
    }
    // The dtype first: a float or bool scalar (numpy.float64(2.0)) is a type error, not a
    // shape one.
    const nb::dlpack::dtype dt = a.dtype();
    const auto code = static_cast<nb::dlpack::dtype_code>(dt.code);
    const bool is_signed = code == nb::dlpack::dtype_code::Int;
    if ((!is_signed && code != nb::dlpack::dtype_code::UInt) || dt.lanes != 1 ||
        (dt.bits != 8 && dt.bits != 16 && dt.bits != 32 && dt.bits != 64)) {
      type_error(op, name, " must hold integers, got ", dlpack_dtype_name(dt));
    }
    if (a.ndim() != 1) detail::fail(op, name, " must be 1-D, got ", a.ndim(), " dimensions");
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
                      : load_unsigned(p, dt.bits, op, name, i);
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

  static std::int64_t load_unsigned(const std::uint8_t* p, int bits, const char* op,
                                    const char* name, std::size_t i) {
    const std::uint64_t v =
        std::uint64_t(load<std::uint8_t, std::uint16_t, std::uint32_t, std::uint64_t>(p, bits));
    if (bits == 64 && v > std::uint64_t(std::numeric_limits<std::int64_t>::max())) {
      detail::fail(op, detail::IndexedName(name, i).text, " must be an int in [",
                   std::numeric_limits<std::int64_t>::min(), ", ",
                   std::numeric_limits<std::int64_t>::max(), "], got ", v);
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
