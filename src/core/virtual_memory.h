#pragma once

// A reserved address range backed by physical memory granule by granule: the backend half of
// CachePool. The CPU backend uses mmap/mprotect/madvise, the CUDA backend the driver's virtual
// memory management (cuMemAddressReserve, cuMemCreate, cuMemMap, cuMemSetAccess).

#include <cstddef>
#include <cstdint>
#include <memory>

namespace tinyserve {

class VirtualRegion {
 public:
  virtual ~VirtualRegion() = default;

  virtual void* base() const = 0;
  virtual std::size_t granule_bytes() const = 0;
  virtual std::size_t num_granules() const = 0;

  // Backs granules [first, first + count), none of them backed yet. All or nothing: on failure
  // what the call backed is released and it throws std::runtime_error naming `op`.
  virtual void map(std::size_t first, std::size_t count, const char* op) = 0;
  // Waits until no work that may read or write the region is pending (CUDA: every stream of the
  // device), so that unmapping cannot pull memory from under it.
  virtual void quiesce(const char* op) = 0;
  // Returns the memory of granules [first, first + count), all of them backed. Call quiesce()
  // first unless the granules were never handed out.
  virtual void unmap(std::size_t first, std::size_t count, const char* op) = 0;
  // Whether granule i is backed, as the backend itself records it.
  virtual bool is_mapped(std::size_t i) const = 0;
};

namespace kernels::cpu {
std::size_t page_bytes();
std::unique_ptr<VirtualRegion> reserve_region(std::size_t num_granules, std::size_t granule_bytes,
                                              const char* op);
}  // namespace kernels::cpu

namespace kernels::cuda {
// The driver's minimum and recommended mapping granularity for device memory of `device`.
std::size_t vmm_min_granule(int device, const char* op);
std::size_t vmm_recommended_granule(int device, const char* op);
std::unique_ptr<VirtualRegion> reserve_region(int device, std::size_t num_granules,
                                              std::size_t granule_bytes, const char* op);
}  // namespace kernels::cuda

}  // namespace tinyserve
