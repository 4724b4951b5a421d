#pragma once

// Device-side element types and conversions.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

namespace tinyserve::kernels::cuda {

// A float8 cache element (stored values scaled by the cache's scale).
template <class KV>
constexpr bool kIsFp8 = std::is_same_v<KV, __nv_fp8_e4m3>;

template <class T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <>
__device__ __forceinline__ float to_float<__nv_fp8_e4m3>(__nv_fp8_e4m3 x) {
  return float(x);
}

template <class T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two floats packed into one 32-bit register of a 16-bit type (low half = first).
template <class T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ std::uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<std::uint32_t*>(&h);
}
template <>
__device__ __forceinline__ std::uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<std::uint32_t*>(&h);
}

// A float8 e4m3fn cache's element: x rounded to nearest even, saturated to +-448 (NaN stays NaN).
__device__ __forceinline__ std::uint8_t to_fp8_e4m3(float x) {
  return __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3);
}

// x as a float8 cache of scale `scale` stores it: x / scale in float32, to_fp8_e4m3 (the rule of
// every float8 cache write; summaries of such a cache read it back).
__device__ __forceinline__ std::uint8_t quantise_e4m3(float x, float scale) {
  return to_fp8_e4m3(x / scale);
}

// Four float8 e4m3fn values (the bytes of x, lowest first) as two packed pairs of a 16-bit type
// (low half = first); exact, since float16 and bfloat16 hold every e4m3 value.
template <class T>
__device__ __forceinline__ uint2 fp8x4_to_pairs(std::uint32_t x);
template <>
__device__ __forceinline__ uint2 fp8x4_to_pairs<__half>(std::uint32_t x) {
  const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(x & 0xffffu), __NV_E4M3);
  const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(x >> 16), __NV_E4M3);
  return make_uint2(lo.x | (std::uint32_t(lo.y) << 16), hi.x | (std::uint32_t(hi.y) << 16));
}
template <>
__device__ __forceinline__ uint2 fp8x4_to_pairs<__nv_bfloat16>(std::uint32_t x) {
  const uint2 halves = fp8x4_to_pairs<__half>(x);
  const __nv_bfloat162 lo =
      __float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&halves.x)));
  const __nv_bfloat162 hi =
      __float22bfloat162_rn(__half22float2(*reinterpret_cast<const __half2*>(&halves.y)));
  return make_uint2(*reinterpret_cast<const std::uint32_t*>(&lo),
                    *reinterpret_cast<const std::uint32_t*>(&hi));
}

}  // namespace tinyserve::kernels::cuda
