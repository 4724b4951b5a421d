#pragma once

// Host-side helpers shared by the CUDA sources: error checks and the device guard.

#include <cuda_runtime.h>

#include "core/validate.h"

namespace tinyserve::kernels::cuda {

inline void check(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear a sticky launch error so later, unrelated calls do not see it
    detail::fail_runtime(op, "CUDA error in ", what, ": ", cudaGetErrorString(err));
  }
}

// Launches `kernel(args)` and checks the launch's own result (check() also clears the runtime's
// sticky last error, so a rejected launch cannot surface in an unrelated later call).
template <class Args>
void launch(const void* kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
            Args& args, const char* op, const char* what) {
  void* params[] = {&args};
  cudaError_t err = cudaLaunchKernel(kernel, grid, block, params, smem, stream);
  check(err, op, what);
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

// Facts of a device, read once per device per process.
struct DeviceInfo {
  int multiprocessors = 0;
  int compute_capability = 0;    // major * 10 + minor
  int max_shared_per_block = 0;  // bytes of shared memory a block may opt in to
  // Whether a kernel may be launched to overlap the previous one on its stream (programmatic
  // dependent launch, sm_90+; see launch_after).
  bool overlaps_launches() const { return compute_capability >= 90; }
};
// A copy: the cache grows when another device is first asked about.
DeviceInfo device_info(int device);

// A launch configuration of one or two attributes (cudaLaunchKernelExC,
// cudaOccupancyMaxActiveClusters).
struct LaunchConfig {
  cudaLaunchConfig_t config{};
  cudaLaunchAttribute attributes[2]{};

  LaunchConfig(dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
               cudaLaunchAttribute a) {
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    attributes[0] = a;
    config.attrs = attributes;
    config.numAttrs = 1;
  }
  LaunchConfig(dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream, cudaLaunchAttribute a,
               cudaLaunchAttribute b)
      : LaunchConfig(grid, block, smem, stream, a) {
    attributes[1] = b;
    config.numAttrs = 2;
  }
  LaunchConfig(const LaunchConfig&) = delete;  // config.attrs points into this object
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Programmatic stream serialisation (sm_90+): the kernel may be scheduled while the previous
// kernel on the stream drains, and must call ptx::wait_for_previous_grid() before it reads
// anything an earlier kernel may write, and before its first write.
inline cudaLaunchAttribute overlap_attribute() {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  a.val.programmaticStreamSerializationAllowed = 1;
  return a;
}

// Clusters of (1, y, 1) CTAs (sm_90+; the grid's y a multiple of y).
inline cudaLaunchAttribute cluster_y_attribute(int y) {
  cudaLaunchAttribute a{};
  a.id = cudaLaunchAttributeClusterDimension;
  a.val.clusterDim.x = 1;
  a.val.clusterDim.y = unsigned(y);
  a.val.clusterDim.z = 1;
  return a;
}

// launch() with one launch attribute.
template <class Args>
void launch_with(const void* kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                 Args& args, cudaLaunchAttribute attribute, const char* op, const char* what) {
  void* params[] = {&args};
  LaunchConfig c(grid, block, smem, stream, attribute);
  check(cudaLaunchKernelExC(&c.config, kernel, params), op, what);
}

// launch() with two launch attributes.
template <class Args>
void launch_with(const void* kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                 Args& args, cudaLaunchAttribute first, cudaLaunchAttribute second, const char* op,
                 const char* what) {
  void* params[] = {&args};
  LaunchConfig c(grid, block, smem, stream, first, second);
  check(cudaLaunchKernelExC(&c.config, kernel, params), op, what);
}

// launch() for a kernel that consumes the previous kernel's output on the same stream. With
// `overlap` (sm_90+), it is launched with programmatic stream serialisation, so it can be
// scheduled while the previous kernel drains; it must call ptx::wait_for_previous_grid() before
// reading that output.
template <class Args>
void launch_after(const void* kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t stream,
                  Args& args, bool overlap, const char* op, const char* what) {
  if (!overlap) return launch(kernel, grid, block, smem, stream, args, op, what);
  launch_with(kernel, grid, block, smem, stream, args, overlap_attribute(), op, what);
}

}  // namespace tinyserve::kernels::cuda
