// The CPU VirtualRegion: one anonymous mapping reserved PROT_NONE, so that nothing is committed
// until a granule is mapped (mprotect to read-write). Unmapping drops the pages (MADV_DONTNEED:
// the memory goes back to the OS at once) and makes the granule inaccessible again, so a stale
// view past the pool's blocks faults here as it would on a GPU instead of silently re-committing
// memory.

#include "core/virtual_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace tinyserve::kernels::cpu {
namespace {

[[noreturn]] void fail(const char* op, const char* what, int err) {
  throw std::runtime_error(std::string("tinyserve.") + op + ": " + what +
                           " failed: " + std::strerror(err));
}

class CpuRegion final : public VirtualRegion {
 public:
  CpuRegion(std::size_t num_granules, std::size_t granule_bytes, const char* op)
      : granule_(granule_bytes), mapped_(num_granules, false) {
    const std::size_t bytes = num_granules * granule_bytes;
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) fail(op, "reserving the address range (mmap)", errno);
    base_ = static_cast<char*>(p);
  }
  ~CpuRegion() override { munmap(base_, mapped_.size() * granule_); }

  void* base() const override { return base_; }
  std::size_t granule_bytes() const override { return granule_; }
  std::size_t num_granules() const override { return mapped_.size(); }

  void map(std::size_t first, std::size_t count, const char* op) override {
    if (count == 0) return;
    char* p = base_ + first * granule_;
    if (mprotect(p, count * granule_, PROT_READ | PROT_WRITE) != 0) {
      const int err = errno;
      mprotect(p, count * granule_, PROT_NONE);  // a partial change is undone
      fail(op, "mapping memory (mprotect)", err);
    }
    for (std::size_t i = first; i < first + count; ++i) mapped_[i] = true;
  }

  void quiesce(const char*) override {}  // CPU ops return only when they are done

  void unmap(std::size_t first, std::size_t count, const char* op) override {
    if (count == 0) return;
    char* p = base_ + first * granule_;
    if (madvise(p, count * granule_, MADV_DONTNEED) != 0) {
      fail(op, "releasing memory (madvise)", errno);
    }
    if (mprotect(p, count * granule_, PROT_NONE) != 0) fail(op, "unmapping (mprotect)", errno);
    for (std::size_t i = first; i < first + count; ++i) mapped_[i] = false;
  }

  bool is_mapped(std::size_t i) const override { return mapped_[i]; }

 private:
  char* base_ = nullptr;
  std::size_t granule_ = 0;
  std::vector<bool> mapped_;
};

}  // namespace

std::size_t page_bytes() { return std::size_t(sysconf(_SC_PAGESIZE)); }

std::unique_ptr<VirtualRegion> reserve_region(std::size_t num_granules, std::size_t granule_bytes,
                                              const char* op) {
  return std::make_unique<CpuRegion>(num_granules, granule_bytes, op);
}

}  // namespace tinyserve::kernels::cpu
