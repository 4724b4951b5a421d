#pragma once

// Host-side 16-bit and 8-bit float storage types and their conversions (round to nearest even).

#include <cmath>
#include <cstdint>
#include <cstring>

namespace tinyserve::cpu {

struct half_t {
  std::uint16_t bits;
};
struct bfloat16_t {
  std::uint16_t bits;
};
// float8 e4m3fn: sign, 4 exponent bits (bias 7), 3 mantissa bits; no infinities, 0x7f/0xff NaN.
struct float8_e4m3_t {
  std::uint8_t bits;
};

inline float to_float(float x) { return x; }

inline float to_float(bfloat16_t x) {
  std::uint32_t u = std::uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(half_t x) {
  std::uint32_t sign = std::uint32_t(x.bits & 0x8000u) << 16;
  std::uint32_t exp = (x.bits >> 10) & 0x1fu;
  std::uint32_t mant = x.bits & 0x3ffu;
  std::uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);  // inf / nan
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: normalise
    int shift = 0;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      ++shift;
    }
    mant &= 0x3ffu;
    u = sign | (std::uint32_t(113 - shift) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float to_float(float8_e4m3_t x) {
  const int exp = (x.bits >> 3) & 0xf, mant = x.bits & 0x7;
  float magnitude;
  if (exp == 0xf && mant == 0x7) {
    magnitude = NAN;
  } else if (exp == 0) {
    magnitude = std::ldexp(float(mant), -9);  // subnormal: mant / 8 * 2^-6
  } else {
    magnitude = std::ldexp(float(8 + mant), exp - 10);  // (1 + mant / 8) * 2^(exp - 7)
  }
  return x.bits & 0x80 ? -magnitude : magnitude;
}

template <class T>
T from_float(float f);

// Rounds to nearest even and saturates to +-448 (the largest finite value); NaN stays NaN.
template <>
inline float8_e4m3_t from_float<float8_e4m3_t>(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  const std::uint8_t sign = std::uint8_t((u >> 24) & 0x80u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {std::uint8_t(sign | 0x7fu)};
  if (abs < 0x3c800000u) {  // below 2^-6, the smallest normal: a multiple of 2^-9 (or 2^-6)
    float magnitude;
    std::memcpy(&magnitude, &abs, 4);
    return {std::uint8_t(sign | std::uint8_t(std::nearbyint(magnitude * 512.0f)))};
  }
  // Keep 3 of the 23 mantissa bits, rounding to nearest even, then rebias the exponent 127 -> 7.
  const std::uint32_t rounded = (abs + 0x7ffffu + ((abs >> 20) & 1u)) >> 20;
  const std::uint32_t bits = rounded - (120u << 3);
  return {std::uint8_t(sign | (abs >= 0x43e00000u || bits > 0x7eu ? 0x7eu : bits))};
}

template <>
inline float from_float<float>(float f) {
  return f;
}

template <>
inline bfloat16_t from_float<bfloat16_t>(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {std::uint16_t((u >> 16) | 0x40u)};  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  return {std::uint16_t(u >> 16)};
}

template <>
inline half_t from_float<half_t>(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  std::uint16_t sign = std::uint16_t((u >> 16) & 0x8000u);
  std::uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) return {std::uint16_t(sign | 0x7e00u)};   // nan
  if (abs >= 0x477ff000u) return {std::uint16_t(sign | 0x7c00u)};  // overflow (rounds to inf)
  if (abs < 0x38800000u) {                                         // result is subnormal or zero
    if (abs < 0x33000000u) return {sign};  // below half the smallest subnormal
    std::uint32_t exp = abs >> 23;
    std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    std::uint32_t shift = 126 - exp;  // 14 + (112 - (exp - 127) - 1) ... aligns to 2^-24 units
    std::uint32_t q = mant >> shift;
    std::uint32_t rem = mant & ((1u << shift) - 1);
    std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
    return {std::uint16_t(sign | q)};
  }
  std::uint32_t r = abs + 0xfffu + ((abs >> 13) & 1u) - 0x38000000u;  // rebias 127 -> 15
  return {std::uint16_t(sign | (r >> 13))};
}

// x as a float8 cache of scale `scale` stores it: x / scale in float32, rounded to nearest even
// and saturated (the rule of every float8 cache write; summaries of such a cache read it back).
inline float8_e4m3_t quantise_e4m3(float x, float scale) {
  return from_float<float8_e4m3_t>(x / scale);
}

}  // namespace tinyserve::cpu
