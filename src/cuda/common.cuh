#pragma once

// Host-side helpers shared by the CUDA sources: error checks and the device guard.

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace tinyserve::kernels::cuda {

inline void check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("tinyserve.") + op + ": CUDA error in " + what + ": " +
                             cudaGetErrorString(err));
  }
}

// Checks that the kernel launch just made was accepted.
inline void check_launch(const char* op, const char* kernel) {
  check(cudaGetLastError(), op, kernel);
}

// Makes `device` current for the scope, restoring the previous device after.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    check(cudaGetDevice(&previous_), op, "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), op, "cudaSetDevice");
  }
  ~DeviceGuard() {
    int current = previous_;
    cudaGetDevice(&current);
    if (current != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// Multiprocessor count of a device, cached (read once per device per process).
int multiprocessor_count(int device);

}  // namespace tinyserve::kernels::cuda
