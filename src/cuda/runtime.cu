// Backend availability and per-device facts.

#include <mutex>
#include <vector>

#include "core/kernels.h"
#include "cuda/common.cuh"

namespace tinyserve::kernels::cuda {

bool compiled() { return true; }

int device_count() {
  // With the runtime linked statically, a machine with no driver answers an error here, which
  // means no device.
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

void synchronize(Stream stream) {
  check(cudaStreamSynchronize(as_stream(stream)), "cuda_stream_synchronize",
        "cudaStreamSynchronize");
}

const DeviceInfo& device_info(int device) {
  static std::mutex mutex;
  static std::vector<DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= int(cache.size())) cache.resize(device + 1);
  DeviceInfo& info = cache[device];
  if (info.multiprocessors == 0) {
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&info.multiprocessors, cudaDevAttrMultiProcessorCount, device),
          "device_info", "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device_info",
          "cudaDeviceGetAttribute");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "device_info",
          "cudaDeviceGetAttribute");
    info.compute_capability = major * 10 + minor;
  }
  return info;
}

}  // namespace tinyserve::kernels::cuda
