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

DeviceInfo device_info(int device) {
  static std::mutex mutex;
  static std::vector<DeviceInfo> cache;  // multiprocessors == 0: not read yet
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= int(cache.size())) cache.resize(device + 1);
  if (cache[device].multiprocessors == 0) {
    // Every fact is read before any is stored: a failed query leaves nothing half cached.
    auto attribute = [device](cudaDeviceAttr which) {
      int value = 0;
      check(cudaDeviceGetAttribute(&value, which, device), "device_info", "cudaDeviceGetAttribute");
      return value;
    };
    DeviceInfo info;
    info.multiprocessors = attribute(cudaDevAttrMultiProcessorCount);
    info.compute_capability = attribute(cudaDevAttrComputeCapabilityMajor) * 10 +
                              attribute(cudaDevAttrComputeCapabilityMinor);
    info.max_shared_per_block = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    cache[device] = info;
  }
  return cache[device];
}

}  // namespace tinyserve::kernels::cuda
