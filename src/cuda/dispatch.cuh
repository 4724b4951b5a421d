#pragma once

// Compile-time choices made from run-time values, in one place: each dispatcher maps a value to
// a template argument and calls `f` with a tag carrying it, so a call site reads
//
//   dispatch_float_dtype(dtype, op, [&](auto type) {
//     using T = typename decltype(type)::type;
//     return kernel<T>;
//   });
//
// and the list of supported values lives here, not in a switch at every launch.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "core/validate.h"
#include "tinyserve/tensor.h"

namespace tinyserve::kernels::cuda {

template <class T>
struct TypeTag {
  using type = T;
};
template <int N>
using IntTag = std::integral_constant<int, N>;
template <bool B>
using BoolTag = std::integral_constant<bool, B>;

// The device element type of a floating dtype the kernels take (attention, cache writes, page
// summaries and scoring).
template <class F>
decltype(auto) dispatch_float_dtype(DType dtype, const char* op, F&& f) {
  switch (dtype) {
    case DType::Float16:
      return f(TypeTag<__half>{});
    case DType::BFloat16:
      return f(TypeTag<__nv_bfloat16>{});
    case DType::Float32:
      return f(TypeTag<float>{});
    default:
      // The core's checks admit only the dtypes above; this names a new one left out here.
      detail::fail(op, "no CUDA kernel for dtype ", dtype_name(dtype));
  }
}

// The device element type of a KV cache read by attention whose query has element type Q: Q
// itself, or float8 e4m3fn (dequantised in the kernel).
template <class Q, class F>
decltype(auto) dispatch_kv_dtype(DType kv_dtype, F&& f) {
  if (kv_dtype == DType::Float8E4M3FN) return f(TypeTag<__nv_fp8_e4m3>{});
  return f(TypeTag<Q>{});
}

// The 16-bit types that have tensor-core (m16n8k16) kernels.
template <class T>
constexpr bool kHasTensorCoreType = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

// The head dims that have tensor-core kernels: f(IntTag<D>) for those, otherwise() for the rest.
template <class F, class G>
decltype(auto) dispatch_mma_head_dim(int head_dim, F&& f, G&& otherwise) {
  switch (head_dim) {
    case 64:
      return f(IntTag<64>{});
    case 128:
      return f(IntTag<128>{});
    case 256:
      return f(IntTag<256>{});
    default:
      return otherwise();
  }
}

template <class F>
decltype(auto) dispatch_bool(bool value, F&& f) {
  return value ? f(BoolTag<true>{}) : f(BoolTag<false>{});
}

// Copy units of byte copies: f(IntTag<W>) for W in 16, 8, 4, 2, 1 (anything else copies bytes).
template <class F>
decltype(auto) dispatch_copy_width(int width, F&& f) {
  switch (width) {
    case 16:
      return f(IntTag<16>{});
    case 8:
      return f(IntTag<8>{});
    case 4:
      return f(IntTag<4>{});
    case 2:
      return f(IntTag<2>{});
    default:
      return f(IntTag<1>{});
  }
}

// Unsigned integer types of an element size: f(TypeTag<uintN_t>) for 1, 2, 4 and 8 bytes
// (anything else uses 8).
template <class F>
decltype(auto) dispatch_element_size(int bytes, F&& f) {
  switch (bytes) {
    case 1:
      return f(TypeTag<std::uint8_t>{});
    case 2:
      return f(TypeTag<std::uint16_t>{});
    case 4:
      return f(TypeTag<std::uint32_t>{});
    default:
      return f(TypeTag<std::uint64_t>{});
  }
}

}  // namespace tinyserve::kernels::cuda
