// The CUDA VirtualRegion: CUDA virtual memory management. One address range is reserved
// (cuMemAddressReserve); each granule gets its own physical allocation (cuMemCreate + cuMemMap),
// so that any tail of granules can be unmapped and released on its own, and a newly mapped run
// gets read-write access for its device in one cuMemSetAccess.
//
// The runtime is linked statically and the library must load where there is no driver, so the
// driver functions are found at run time through cudaGetDriverEntryPointByVersion; cuda.h gives
// only their types.

#include <cuda.h>

#include <mutex>
#include <string>
#include <vector>

#include "core/virtual_memory.h"
#include "cuda/common.cuh"

namespace tinyserve::kernels::cuda {
namespace {

// The driver ABI of these functions is unchanged since CUDA 10.2; ask for the 12.0 entry points.
constexpr unsigned kDriverApiVersion = 12000;

struct Driver {
  decltype(&::cuGetErrorName) get_error_name = nullptr;
  decltype(&::cuGetErrorString) get_error_string = nullptr;
  decltype(&::cuDeviceGetAttribute) get_attribute = nullptr;
  decltype(&::cuMemGetAllocationGranularity) get_granularity = nullptr;
  decltype(&::cuMemAddressReserve) address_reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemCreate) create = nullptr;
  decltype(&::cuMemRelease) release = nullptr;
  decltype(&::cuMemMap) map = nullptr;
  decltype(&::cuMemUnmap) unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;
  decltype(&::cuMemRetainAllocationHandle) retain_handle = nullptr;
  std::string missing;  // the first function the driver did not provide
};

template <class F>
void load(const char* name, F& fn, std::string& missing) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err =
      cudaGetDriverEntryPointByVersion(name, &p, kDriverApiVersion, cudaEnableDefault, &status);
  if (err != cudaSuccess || status != cudaDriverEntryPointSuccess || p == nullptr) {
    cudaGetLastError();
    if (missing.empty()) {
      missing = std::string(name) + " (" +
                (err != cudaSuccess ? cudaGetErrorString(err) : "symbol not found") + ")";
    }
    return;
  }
  fn = reinterpret_cast<F>(p);
}

const Driver& driver(const char* op) {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    load("cuGetErrorName", d.get_error_name, d.missing);
    load("cuGetErrorString", d.get_error_string, d.missing);
    load("cuDeviceGetAttribute", d.get_attribute, d.missing);
    load("cuMemGetAllocationGranularity", d.get_granularity, d.missing);
    load("cuMemAddressReserve", d.address_reserve, d.missing);
    load("cuMemAddressFree", d.address_free, d.missing);
    load("cuMemCreate", d.create, d.missing);
    load("cuMemRelease", d.release, d.missing);
    load("cuMemMap", d.map, d.missing);
    load("cuMemUnmap", d.unmap, d.missing);
    load("cuMemSetAccess", d.set_access, d.missing);
    load("cuMemRetainAllocationHandle", d.retain_handle, d.missing);
  });
  if (!d.missing.empty()) {
    detail::fail_runtime(op,
                         "the CUDA driver does not provide virtual memory management, got no entry "
                         "point for ",
                         d.missing);
  }
  return d;
}

void check_driver(CUresult r, const char* op, const char* what) {
  if (r == CUDA_SUCCESS) return;
  const Driver& d = driver(op);
  const char* name = nullptr;
  const char* text = nullptr;
  d.get_error_name(r, &name);
  d.get_error_string(r, &text);
  detail::fail_runtime(op, "CUDA driver error in ", what, ": ", text ? text : "unknown error", " (",
                       name ? std::string(name) : std::to_string(int(r)), ")");
}

CUmemAllocationProp device_allocation(int device) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_NONE;
  return prop;
}

// The driver calls need the current device's primary context, which cudaFree(0) creates.
void make_current(const char* op) { check(cudaFree(nullptr), op, "cudaFree(0)"); }

std::size_t granularity(int device, CUmemAllocationGranularity_flags which, const char* op) {
  const Driver& d = driver(op);
  DeviceGuard guard(device, op);
  make_current(op);
  int supported = 0;
  check_driver(
      d.get_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, device),
      op, "cuDeviceGetAttribute");
  if (!supported) {
    detail::fail_runtime(op, "CUDA device ", device,
                         " does not support virtual memory management, got "
                         "CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 0");
  }
  const CUmemAllocationProp prop = device_allocation(device);
  std::size_t bytes = 0;
  check_driver(d.get_granularity(&bytes, &prop, which), op, "cuMemGetAllocationGranularity");
  return bytes;
}

class CudaRegion final : public VirtualRegion {
 public:
  CudaRegion(int device, std::size_t num_granules, std::size_t granule_bytes, const char* op)
      : device_(device),
        granule_(granule_bytes),
        prop_(device_allocation(device)),
        handles_(num_granules, 0),
        mapped_(num_granules, false) {
    const Driver& d = driver(op);
    DeviceGuard guard(device_, op);
    make_current(op);
    // Every granule's address must be aligned to the driver's granularity, which divides the
    // granule; the alignment must be a power of two: the granule's lowest set bit is both.
    const std::size_t alignment = granule_ & (~granule_ + 1);
    check_driver(d.address_reserve(&base_, num_granules * granule_, alignment, 0, 0), op,
                 "cuMemAddressReserve");
  }

  ~CudaRegion() override {
    // Destructors cannot report: release what can be released and carry on.
    const Driver& d = driver("CachePool");
    int previous = 0;
    cudaGetDevice(&previous);
    cudaSetDevice(device_);
    cudaDeviceSynchronize();
    for (std::size_t i = 0; i < mapped_.size(); ++i) {
      if (!mapped_[i]) continue;
      d.unmap(address(i), granule_);
      d.release(handles_[i]);
    }
    d.address_free(base_, mapped_.size() * granule_);
    cudaGetLastError();
    cudaSetDevice(previous);
  }

  void* base() const override { return reinterpret_cast<void*>(base_); }
  std::size_t granule_bytes() const override { return granule_; }
  std::size_t num_granules() const override { return mapped_.size(); }

  void map(std::size_t first, std::size_t count, const char* op) override {
    if (count == 0) return;
    const Driver& d = driver(op);
    DeviceGuard guard(device_, op);
    make_current(op);
    std::size_t done = 0;
    try {
      for (; done < count; ++done) {
        const std::size_t i = first + done;
        CUmemGenericAllocationHandle handle = 0;
        check_driver(d.create(&handle, granule_, &prop_, 0), op, "cuMemCreate");
        const CUresult r = d.map(address(i), granule_, 0, handle, 0);
        if (r != CUDA_SUCCESS) {
          d.release(handle);
          check_driver(r, op, "cuMemMap");
        }
        handles_[i] = handle;
        mapped_[i] = true;
      }
      CUmemAccessDesc access{};
      access.location = prop_.location;
      access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
      check_driver(d.set_access(address(first), count * granule_, &access, 1), op,
                   "cuMemSetAccess");
    } catch (...) {
      release(first, done);
      throw;
    }
  }

  void quiesce(const char* op) override {
    DeviceGuard guard(device_, op);
    check(cudaDeviceSynchronize(), op, "cudaDeviceSynchronize");
  }

  void unmap(std::size_t first, std::size_t count, const char* op) override {
    if (count == 0) return;
    const Driver& d = driver(op);
    DeviceGuard guard(device_, op);
    make_current(op);
    for (std::size_t i = first; i < first + count; ++i) {
      check_driver(d.unmap(address(i), granule_), op, "cuMemUnmap");
      mapped_[i] = false;
      check_driver(d.release(handles_[i]), op, "cuMemRelease");
      handles_[i] = 0;
    }
  }

  // For a granule recorded as mapped, asks the driver which allocation backs it rather than
  // trusting the record. A granule recorded as unmapped is not probed: the driver answers such a
  // query with an error, which compute-sanitizer reports as a failed API call.
  bool is_mapped(std::size_t i) const override {
    if (!mapped_[i]) return false;
    const Driver& d = driver("CachePool.check");
    DeviceGuard guard(device_, "CachePool.check");
    CUmemGenericAllocationHandle handle = 0;
    if (d.retain_handle(&handle, reinterpret_cast<void*>(address(i))) != CUDA_SUCCESS) {
      return false;
    }
    d.release(handle);  // the retain took a reference
    return handle == handles_[i];
  }

 private:
  CUdeviceptr address(std::size_t i) const { return base_ + i * granule_; }

  // Undoes the mapping of granules [first, first + count) during a failed map().
  void release(std::size_t first, std::size_t count) {
    const Driver& d = driver("CachePool");
    for (std::size_t i = first; i < first + count; ++i) {
      d.unmap(address(i), granule_);
      d.release(handles_[i]);
      handles_[i] = 0;
      mapped_[i] = false;
    }
  }

  int device_ = 0;
  std::size_t granule_ = 0;
  CUmemAllocationProp prop_{};
  CUdeviceptr base_ = 0;
  std::vector<CUmemGenericAllocationHandle> handles_;
  std::vector<bool> mapped_;
};

}  // namespace

std::size_t vmm_min_granule(int device, const char* op) {
  return granularity(device, CU_MEM_ALLOC_GRANULARITY_MINIMUM, op);
}

std::size_t vmm_recommended_granule(int device, const char* op) {
  return granularity(device, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED, op);
}

std::unique_ptr<VirtualRegion> reserve_region(int device, std::size_t num_granules,
                                              std::size_t granule_bytes, const char* op) {
  return std::make_unique<CudaRegion>(device, num_granules, granule_bytes, op);
}

}  // namespace tinyserve::kernels::cuda
