// The CUDA backend of a build without nvcc: it reports itself absent, and every entry point
// fails with a precise error. The core reaches these only for tensors on a CUDA device.

#include "core/kernels.h"
#include "core/validate.h"
#include "core/virtual_memory.h"

namespace tinyserve::kernels::cuda {
namespace {

[[noreturn]] void unavailable(const char* op) {
  detail::fail_runtime(op,
                       "tinyserve was built without CUDA (rebuild with nvcc on the PATH, or "
                       "TINYSERVE_CUDA=ON)");
}

}  // namespace

bool compiled() { return false; }
int device_count() { return 0; }
void reshape_and_cache(const ReshapeAndCacheParams&, Stream) { unavailable("reshape_and_cache"); }
void paged_attention(const PagedAttentionParams&, Stream) { unavailable("paged_attention"); }
void select_pages(const SelectPagesParams&, Stream) { unavailable("select_pages"); }
void build_page_meta(const BuildPageMetaParams&, Stream) { unavailable("build_page_meta"); }
int plan_attention_splits(int, DType, DType, int, int, int, int, std::int64_t,
                          const std::vector<std::int64_t>&, int) {
  unavailable("plan_paged_attention");
}
int plan_prefill_splits(int, DType, DType, int, std::int64_t, int, int, int, std::int64_t) {
  unavailable("plan_paged_attention");
}
void copy_blocks(const CopyBlocksParams&, Stream) { unavailable("copy_blocks"); }
void swap_blocks(const SwapBlocksParams&, Stream) { unavailable("swap_blocks"); }
void synchronize(Stream) { unavailable("synchronize"); }
std::size_t vmm_min_granule(int, const char* op) { unavailable(op); }
std::size_t vmm_recommended_granule(int, const char* op) { unavailable(op); }
std::unique_ptr<VirtualRegion> reserve_region(int, std::size_t, std::size_t, const char* op) {
  unavailable(op);
}

}  // namespace tinyserve::kernels::cuda
