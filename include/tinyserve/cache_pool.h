#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "tinyserve/export.h"
#include "tinyserve/tensor.h"

namespace tinyserve {

// How a cache tensor's block is stored. Views always have the logical shape
// [num_blocks, block_size, num_kv_heads, head_dim]; HND storage is exposed as the permuted view.
enum class CacheLayout : std::int8_t { NHD, HND };

struct CachePoolConfig {
  int num_layers = 0;
  std::int64_t max_blocks = 0;  // the address range reserved for every tensor
  int block_size = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  DType dtype = DType::Float16;  // float16, bfloat16, float32 or float8 e4m3fn
  Device device{};               // CPU or CUDA
  CacheLayout layout = CacheLayout::NHD;
  // Also hold, per layer, the page summaries [num_blocks, num_kv_heads, 2, head_dim] (in
  // page_meta_dtype) that reshape_and_cache and select_pages use.
  bool page_meta = false;
  // The unit of mapping: 0 picks the backend's (CUDA: the driver's recommended granularity,
  // usually 2 MiB; CPU: the page size). Otherwise a multiple of the backend's minimum.
  std::size_t granule_bytes = 0;
  std::int64_t num_blocks = 0;  // blocks mapped at construction
  // The page summaries' dtype (needs page_meta); none: the caches'. Float8 e4m3fn summaries take
  // half the bytes of 16-bit ones (see selection.h); over float8 caches the summaries may also
  // be float16, bfloat16 or float32 (the query's precision).
  std::optional<DType> page_meta_dtype;
};

// The device memory of a paged KV cache, reserved once for max_blocks and backed by physical
// memory only up to num_blocks: grow() maps more, shrink() unmaps the tail and gives it back
// (on CUDA to the driver, where cudaMemGetInfo and other processes see it; on the CPU to the OS).
//
// Every tensor (per layer: K, V, and the page summaries when asked for) has its own
// granule-aligned region of the one reserved range, indexed by block along dimension 0. A
// tensor's base address never changes; grow and shrink change only how many blocks are backed.
// Views (TensorView) carry the num_blocks of the moment they were made: fetch them again after
// grow or shrink, and never touch blocks at or past num_blocks (unmapped memory: a fault).
//
// Mapping is in granules: a tensor backs ceil(num_blocks * bytes per block / granule) granules,
// so mapped_bytes() is exact and the tail that shrink() frees is whole granules.
//
// Invariants (check() verifies them): every tensor backs exactly the granules its num_blocks
// needs and no other; mapped_bytes() is their sum. Failed calls change nothing. Thread-safe.
class TINYSERVE_API CachePool {
 public:
  explicit CachePool(const CachePoolConfig& config);
  ~CachePool();
  CachePool(const CachePool&) = delete;
  CachePool& operator=(const CachePool&) = delete;

  // Backs blocks up to num_blocks (num_blocks() <= num_blocks <= max_blocks). The new blocks'
  // contents are unspecified. All or nothing: if memory runs out, what this call mapped is
  // released and it throws std::runtime_error.
  void grow(std::int64_t num_blocks);
  // Keeps blocks [0, num_blocks) and unmaps every granule past them, returning the memory. On
  // CUDA it first waits for all work on the device (as cudaFree does): any stream may still be
  // reading the tail, e.g. the copies of a compaction.
  void shrink(std::int64_t num_blocks);

  std::int64_t num_blocks() const;
  const CachePoolConfig& config() const;
  std::size_t granule_bytes() const;
  std::size_t mapped_bytes() const;     // physical memory now backing the pool
  std::size_t reserved_bytes() const;   // the reserved address range
  std::size_t bytes_per_block() const;  // one block over every tensor (K, V, page summaries)
  int num_tensors() const;              // num_layers * (2 or 3)

  TensorView key(int layer) const;
  TensorView value(int layer) const;
  TensorView page_meta(int layer) const;  // throws std::invalid_argument without page_meta
  // Every tensor, layer by layer: K, V (and page summaries), the order copy_blocks takes.
  std::vector<TensorView> tensors() const;

  // Verifies the invariants against the backend's own record of what is mapped; throws
  // std::logic_error on a violation.
  void check() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace tinyserve
