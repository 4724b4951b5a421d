#pragma once

// Float32 vector loops of the CPU backend. They are compiled once per instruction-set level and
// the best one for the running CPU is picked at load time (GCC/Clang function multiversioning).

namespace tinyserve::cpu::simd {

float dot(const float* a, const float* b, int n);
void axpy(float* y, float a, const float* x, int n);  // y += a * x
void scale(float* y, float a, int n);                 // y *= a

}  // namespace tinyserve::cpu::simd
