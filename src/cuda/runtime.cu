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

int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (device >= int(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    int n = 0;
    check(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device),
          "paged_attention", "cudaDeviceGetAttribute");
    cache[device] = n;
  }
  return cache[device];
}

}  // namespace tinyserve::kernels::cuda
