// CUDA cache writes, block copies and host<->device block swaps.

#include <algorithm>
#include <climits>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "core/kernels.h"
#include "core/validate.h"
#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/page_meta.cuh"

namespace tinyserve::kernels::cuda {
namespace {

// An unsigned integer type of N bytes: the unit of a vectorised copy.
template <int N>
struct Word;
template <>
struct Word<16> {
  using type = uint4;
};
template <>
struct Word<8> {
  using type = uint2;
};
template <>
struct Word<4> {
  using type = std::uint32_t;
};
template <>
struct Word<2> {
  using type = std::uint16_t;
};
template <>
struct Word<1> {
  using type = std::uint8_t;
};

// The widest copy unit (16, 8, 4, 2 or 1 bytes) that divides every value given.
int copy_width(std::initializer_list<std::uint64_t> values) {
  for (int w : {16, 8, 4, 2}) {
    bool ok = true;
    for (std::uint64_t v : values) ok = ok && v % w == 0;
    if (ok) return w;
  }
  return 1;
}

// ---------------------------------------------------------------------------------------------
// reshape_and_cache: one thread block per token (grid-stride), threads over (head, word).

struct ReshapeArgs {
  const char* key;
  const char* value;
  char* key_cache;
  char* value_cache;
  const std::int64_t* slot_mapping;
  std::int64_t key_stride_token, key_stride_head;  // bytes
  std::int64_t value_stride_token, value_stride_head;
  std::int64_t kc_stride_block, kc_stride_token, kc_stride_head;
  std::int64_t vc_stride_block, vc_stride_token, vc_stride_head;
  std::int64_t num_tokens;
  std::int64_t num_slots;
  int block_size;
  int num_heads;
  int words_per_row;
};

template <int W>
__global__ void reshape_and_cache_kernel(const __grid_constant__ ReshapeArgs a) {
  using word = typename Word<W>::type;
  const int per_token = a.num_heads * a.words_per_row;
  for (std::int64_t tok = blockIdx.x; tok < a.num_tokens; tok += gridDim.x) {
    const std::int64_t slot = a.slot_mapping[tok];
    if (slot < 0 || slot >= a.num_slots) continue;  // -1 = padding; out of range never written
    const std::int64_t block = slot / a.block_size;
    const std::int64_t offset = slot - block * a.block_size;
    char* kc = a.key_cache + block * a.kc_stride_block + offset * a.kc_stride_token;
    char* vc = a.value_cache + block * a.vc_stride_block + offset * a.vc_stride_token;
    const char* k = a.key + tok * a.key_stride_token;
    const char* v = a.value + tok * a.value_stride_token;
    for (int i = threadIdx.x; i < per_token; i += blockDim.x) {
      const int head = i / a.words_per_row;
      const int w = i - head * a.words_per_row;
      const word kw = reinterpret_cast<const word*>(k + head * a.key_stride_head)[w];
      const word vw = reinterpret_cast<const word*>(v + head * a.value_stride_head)[w];
      reinterpret_cast<word*>(kc + head * a.kc_stride_head)[w] = kw;
      reinterpret_cast<word*>(vc + head * a.vc_stride_head)[w] = vw;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// reshape_and_cache into float8 caches: one thread block per token (grid-stride), a thread per
// element; stored = x / scale, rounded to nearest even and saturated (the CPU backend's rule, the
// same float32 division).

struct QuantiseArgs {
  const void* key;
  const void* value;
  std::uint8_t* key_cache;
  std::uint8_t* value_cache;
  const std::int64_t* slot_mapping;
  std::int64_t key_stride_token, key_stride_head;  // elements
  std::int64_t value_stride_token, value_stride_head;
  std::int64_t kc_stride_block, kc_stride_token, kc_stride_head;
  std::int64_t vc_stride_block, vc_stride_token, vc_stride_head;
  ScaleArg k_scale, v_scale;  // per_head read from device memory when set
  std::int64_t num_tokens;
  std::int64_t num_slots;
  int block_size;
  int num_heads;
  int head_dim;
};

template <class T>
__global__ void reshape_and_quantise_kernel(const __grid_constant__ QuantiseArgs a) {
  const int per_token = a.num_heads * a.head_dim;
  for (std::int64_t tok = blockIdx.x; tok < a.num_tokens; tok += gridDim.x) {
    const std::int64_t slot = a.slot_mapping[tok];
    if (slot < 0 || slot >= a.num_slots) continue;  // -1 = padding; out of range never written
    const std::int64_t block = slot / a.block_size;
    const std::int64_t offset = slot - block * a.block_size;
    const T* k = static_cast<const T*>(a.key) + tok * a.key_stride_token;
    const T* v = static_cast<const T*>(a.value) + tok * a.value_stride_token;
    std::uint8_t* kc = a.key_cache + block * a.kc_stride_block + offset * a.kc_stride_token;
    std::uint8_t* vc = a.value_cache + block * a.vc_stride_block + offset * a.vc_stride_token;
    for (int i = threadIdx.x; i < per_token; i += blockDim.x) {
      const int head = i / a.head_dim;
      const int d = i - head * a.head_dim;
      const float kx = to_float(k[head * a.key_stride_head + d]);
      const float vx = to_float(v[head * a.value_stride_head + d]);
      kc[head * a.kc_stride_head + d] = quantise_e4m3(kx, a.k_scale.of(head));
      vc[head * a.vc_stride_head + d] = quantise_e4m3(vx, a.v_scale.of(head));
    }
  }
}

void reshape_and_quantise(const ReshapeAndCacheParams& p, cudaStream_t stream, const char* op) {
  QuantiseArgs a{};
  a.key = p.key;
  a.value = p.value;
  a.key_cache = static_cast<std::uint8_t*>(p.key_cache.data);
  a.value_cache = static_cast<std::uint8_t*>(p.value_cache.data);
  a.slot_mapping = p.slot_mapping;
  a.key_stride_token = p.key_stride_token;
  a.key_stride_head = p.key_stride_head;
  a.value_stride_token = p.value_stride_token;
  a.value_stride_head = p.value_stride_head;
  a.kc_stride_block = p.key_cache.stride_block;
  a.kc_stride_token = p.key_cache.stride_token;
  a.kc_stride_head = p.key_cache.stride_head;
  a.vc_stride_block = p.value_cache.stride_block;
  a.vc_stride_token = p.value_cache.stride_token;
  a.vc_stride_head = p.value_cache.stride_head;
  a.k_scale = p.k_scale;
  a.v_scale = p.v_scale;
  a.num_tokens = p.num_tokens;
  a.num_slots = p.num_blocks * p.block_size;
  a.block_size = p.block_size;
  a.num_heads = p.num_heads;
  a.head_dim = p.head_dim;
  const int per_token = p.num_heads * p.head_dim;
  const int threads = std::min(256, std::max(32, (per_token + 31) / 32 * 32));
  const unsigned grid = unsigned(std::min<std::int64_t>(p.num_tokens, 1 << 30));
  const void* kernel = dispatch_float_dtype(p.dtype, op, [](auto type) {
    return reinterpret_cast<const void*>(
        reshape_and_quantise_kernel<typename decltype(type)::type>);
  });
  launch(kernel, dim3(grid), dim3(threads), 0, stream, a, op, "reshape_and_quantise_kernel");
}

// ---------------------------------------------------------------------------------------------
// copy_blocks: dense tensors, every (pair, tensor) in one launch; grid (pairs, tensors).

// 40 bytes each: the launch's parameters stay under the classic 4 KB limit, and 32 layers of K
// and V caches still go in one launch.
constexpr int kMaxCopyTensors = 96;

struct CopyEntry {
  char* data;
  std::int64_t stride_block;  // bytes
  std::int64_t block_bytes;
  std::int64_t num_blocks;
  int width;  // copy unit in bytes
};

// Block ids are int32 or int64 (Id); the kernels read them on the device.
template <class Id>
struct CopyArgs {
  CopyEntry entries[kMaxCopyTensors];
  const Id* src;
  const Id* dst;
  std::int64_t num_pairs;
};

template <int W>
__device__ __forceinline__ void copy_words(char* dst, const char* src, std::int64_t bytes) {
  using word = typename Word<W>::type;
  const word* s = reinterpret_cast<const word*>(src);
  word* d = reinterpret_cast<word*>(dst);
  for (std::int64_t i = threadIdx.x; i < bytes / W; i += blockDim.x) d[i] = s[i];
}

template <class Id>
__global__ void copy_blocks_kernel(const __grid_constant__ CopyArgs<Id> a) {
  const CopyEntry& e = a.entries[blockIdx.y];
  for (std::int64_t pair = blockIdx.x; pair < a.num_pairs; pair += gridDim.x) {
    const std::int64_t s = a.src[pair], d = a.dst[pair];
    if (s < 0 || s >= e.num_blocks || d < 0 || d >= e.num_blocks) continue;  // never out of bounds
    char* to = e.data + d * e.stride_block;
    const char* from = e.data + s * e.stride_block;
    switch (e.width) {
      case 16:
        copy_words<16>(to, from, e.block_bytes);
        break;
      case 8:
        copy_words<8>(to, from, e.block_bytes);
        break;
      case 4:
        copy_words<4>(to, from, e.block_bytes);
        break;
      case 2:
        copy_words<2>(to, from, e.block_bytes);
        break;
      default:
        copy_words<1>(to, from, e.block_bytes);
        break;
    }
  }
}

// copy_blocks for a tensor whose blocks are not one contiguous run: element by element.
template <class Id>
struct StridedCopyArgs {
  char* data;
  std::int64_t stride_block;  // elements
  std::int64_t num_blocks;
  std::int64_t inner_shape[kMaxDims - 1];
  std::int64_t inner_strides[kMaxDims - 1];
  std::int64_t inner_numel;
  int inner_ndim;
  const Id* src;
  const Id* dst;
  std::int64_t num_pairs;
};

// A 16-byte element (complex128) moved as two 8-byte halves: its alignment may be only 8.
struct Bytes16 {
  std::uint64_t lo, hi;
};

template <class E, class Id>
__global__ void strided_copy_kernel(const __grid_constant__ StridedCopyArgs<Id> a) {
  E* base = reinterpret_cast<E*>(a.data);
  for (std::int64_t pair = blockIdx.y; pair < a.num_pairs; pair += gridDim.y) {
    const std::int64_t s = a.src[pair], d = a.dst[pair];
    if (s < 0 || s >= a.num_blocks || d < 0 || d >= a.num_blocks) continue;
    for (std::int64_t i = blockIdx.x * std::int64_t(blockDim.x) + threadIdx.x; i < a.inner_numel;
         i += std::int64_t(gridDim.x) * blockDim.x) {
      std::int64_t rest = i, offset = 0;
      for (int k = a.inner_ndim - 1; k >= 0; --k) {
        offset += (rest % a.inner_shape[k]) * a.inner_strides[k];
        rest /= a.inner_shape[k];
      }
      base[d * a.stride_block + offset] = base[s * a.stride_block + offset];
    }
  }
}

template <class Id>
const void* strided_copy_for(int elem_size) {
  if (elem_size == 16) {
    return reinterpret_cast<const void*>(strided_copy_kernel<Bytes16, Id>);
  }
  return dispatch_element_size(elem_size, [](auto e) {
    return reinterpret_cast<const void*>(strided_copy_kernel<typename decltype(e)::type, Id>);
  });
}

// Grid limits: x up to 2**31 - 1, y up to 65535; the kernels loop over what does not fit.
constexpr std::int64_t kMaxGridX = 0x7fffffff;
constexpr std::int64_t kMaxGridY = 65535;

template <class Id>
void copy_blocks_with(const CopyBlocksParams& p, cudaStream_t s) {
  const char* op = "copy_blocks";
  const Id* src = static_cast<const Id*>(p.src.data);
  const Id* dst = static_cast<const Id*>(p.dst.data);
  CopyArgs<Id> dense{};
  dense.src = src;
  dense.dst = dst;
  dense.num_pairs = p.num_pairs;
  const unsigned pairs_x = unsigned(std::min(p.num_pairs, kMaxGridX));
  int count = 0;
  auto flush = [&] {
    if (count == 0) return;
    launch(reinterpret_cast<const void*>(copy_blocks_kernel<Id>), dim3(pairs_x, unsigned(count)),
           dim3(256), 0, s, dense, op, "copy_blocks_kernel");
    count = 0;
  };
  for (const BlockTensor& t : p.tensors) {
    if (t.num_blocks == 0 || t.inner_numel == 0) continue;
    if (!t.dense) {
      StridedCopyArgs<Id> a{};
      a.data = static_cast<char*>(t.data);
      a.stride_block = t.stride_block;
      a.num_blocks = t.num_blocks;
      for (int i = 0; i < t.inner_ndim; ++i) {
        a.inner_shape[i] = t.inner_shape[i];
        a.inner_strides[i] = t.inner_strides[i];
      }
      a.inner_numel = t.inner_numel;
      a.inner_ndim = t.inner_ndim;
      a.src = src;
      a.dst = dst;
      a.num_pairs = p.num_pairs;
      dim3 grid(unsigned(std::min<std::int64_t>((t.inner_numel + 255) / 256, 1024)),
                unsigned(std::min(p.num_pairs, kMaxGridY)));
      launch(strided_copy_for<Id>(t.elem_size), grid, dim3(256), 0, s, a, op,
             "strided_copy_kernel");
      continue;
    }
    CopyEntry& e = dense.entries[count++];
    e.data = static_cast<char*>(t.data);
    e.stride_block = t.stride_block * t.elem_size;
    e.block_bytes = t.inner_numel * t.elem_size;
    e.num_blocks = t.num_blocks;
    e.width = copy_width({std::uint64_t(reinterpret_cast<std::uintptr_t>(e.data)),
                          std::uint64_t(e.stride_block), std::uint64_t(e.block_bytes)});
    if (count == kMaxCopyTensors) flush();
  }
  flush();
}

// ---------------------------------------------------------------------------------------------
// swap_blocks over memory the device addresses (mapped pinned host memory, device memory): one
// kernel whose CTAs read and write the host side directly over the bus (zero-copy). Each CTA
// copies one slice of one pair's block; each thread has kSwapUnroll words in flight before it
// stores any, and a warp's words are consecutive, so a warp moves whole 128-byte lines. Many
// small blocks then fill the link as one large copy does, where one copy per block cannot.

constexpr int kSwapThreads = 256;
constexpr int kSwapUnroll = 8;  // 16-byte words: a CTA moves 32 KiB per step

// The pairs travel in the kernel's parameters (up to 32,764 bytes from CUDA 12.1 on sm_70+), so
// nothing is copied to the device first and a captured graph keeps its own copy of them.
constexpr std::size_t kSwapParamBytes = 32000;

template <class Id>
struct SwapPair {
  Id src, dst;
};

template <class Id>
struct SwapArgs {
  static constexpr int kMaxPairs = int((kSwapParamBytes - 48) / sizeof(SwapPair<Id>));
  const char* src;
  char* dst;
  std::int64_t src_stride, dst_stride;  // bytes
  std::int64_t block_bytes;
  std::int64_t num_pairs;
  SwapPair<Id> pairs[kMaxPairs];
};
static_assert(sizeof(SwapArgs<std::int32_t>) <= 32764 && sizeof(SwapArgs<std::int64_t>) <= 32764,
              "kernel parameters are limited to 32,764 bytes");

template <int W, class Id>
__global__ void __launch_bounds__(kSwapThreads)
    swap_blocks_kernel(const __grid_constant__ SwapArgs<Id> a) {
  using word = typename Word<W>::type;
  const SwapPair<Id> pair = a.pairs[blockIdx.x];
  const word* from = reinterpret_cast<const word*>(a.src + pair.src * a.src_stride);
  word* to = reinterpret_cast<word*>(a.dst + pair.dst * a.dst_stride);
  const std::int64_t words = a.block_bytes / W;
  constexpr int kStep = kSwapThreads * kSwapUnroll;
  for (std::int64_t base = std::int64_t(blockIdx.y) * kStep + threadIdx.x; base < words;
       base += std::int64_t(gridDim.y) * kStep) {
    word held[kSwapUnroll];
#pragma unroll
    for (int u = 0; u < kSwapUnroll; ++u) {
      const std::int64_t i = base + u * kSwapThreads;
      if (i < words) held[u] = from[i];
    }
#pragma unroll
    for (int u = 0; u < kSwapUnroll; ++u) {
      const std::int64_t i = base + u * kSwapThreads;
      if (i < words) to[i] = held[u];
    }
  }
}

// Launches the swap kernel over every pair, as many pairs per launch as the parameters hold.
template <class Id>
void swap_with_kernel(const SwapBlocksParams& p, const char* src, char* dst, cudaStream_t s) {
  SwapArgs<Id> a{};
  a.src = src;
  a.dst = dst;
  a.src_stride = p.src_cache.stride_block * p.src_cache.elem_size;
  a.dst_stride = p.dst_cache.stride_block * p.dst_cache.elem_size;
  a.block_bytes = p.src_cache.inner_numel * p.src_cache.elem_size;
  auto u = [](auto x) { return static_cast<std::uint64_t>(x); };
  const int width = copy_width({u(reinterpret_cast<std::uintptr_t>(src)),
                                u(reinterpret_cast<std::uintptr_t>(dst)), u(a.src_stride),
                                u(a.dst_stride), u(a.block_bytes)});
  const std::int64_t steps =
      (a.block_bytes / width + kSwapThreads * kSwapUnroll - 1) / (kSwapThreads * kSwapUnroll);
  const unsigned slices = unsigned(std::min(steps, kMaxGridY));
  const void* kernel = dispatch_copy_width(width, [](auto w) {
    return reinterpret_cast<const void*>(swap_blocks_kernel<decltype(w)::value, Id>);
  });
  for (std::int64_t first = 0; first < p.num_pairs; first += SwapArgs<Id>::kMaxPairs) {
    const std::int64_t n = std::min<std::int64_t>(p.num_pairs - first, SwapArgs<Id>::kMaxPairs);
    for (std::int64_t i = 0; i < n; ++i) {
      a.pairs[i] = {Id(p.src[first + i]), Id(p.dst[first + i])};
    }
    a.num_pairs = n;
    launch(kernel, dim3(unsigned(n), slices), dim3(kSwapThreads), 0, s, a, "swap_blocks",
           "swap_blocks_kernel");
  }
}

}  // namespace

void reshape_and_cache(const ReshapeAndCacheParams& p, Stream stream) {
  const char* op = "reshape_and_cache";
  DeviceGuard guard(p.device_index, op);
  if (p.cache_dtype == DType::Float8E4M3FN) {
    reshape_and_quantise(p, as_stream(stream), op);
    if (p.page_meta.data != nullptr) update_page_meta(p, stream);
    return;
  }
  const std::int64_t e = std::int64_t(dtype_size(p.dtype));
  ReshapeArgs a;
  a.key = static_cast<const char*>(p.key);
  a.value = static_cast<const char*>(p.value);
  a.key_cache = static_cast<char*>(p.key_cache.data);
  a.value_cache = static_cast<char*>(p.value_cache.data);
  a.slot_mapping = p.slot_mapping;
  a.key_stride_token = p.key_stride_token * e;
  a.key_stride_head = p.key_stride_head * e;
  a.value_stride_token = p.value_stride_token * e;
  a.value_stride_head = p.value_stride_head * e;
  a.kc_stride_block = p.key_cache.stride_block * e;
  a.kc_stride_token = p.key_cache.stride_token * e;
  a.kc_stride_head = p.key_cache.stride_head * e;
  a.vc_stride_block = p.value_cache.stride_block * e;
  a.vc_stride_token = p.value_cache.stride_token * e;
  a.vc_stride_head = p.value_cache.stride_head * e;
  a.num_tokens = p.num_tokens;
  a.num_slots = p.num_blocks * p.block_size;
  a.block_size = p.block_size;
  a.num_heads = p.num_heads;
  const std::uint64_t row_bytes = std::uint64_t(p.head_dim) * e;
  auto u = [](auto x) { return static_cast<std::uint64_t>(x); };
  // Negative strides are fine for the width test: only divisibility matters.
  const int width =
      copy_width({row_bytes, u(reinterpret_cast<std::uintptr_t>(a.key)),
                  u(reinterpret_cast<std::uintptr_t>(a.value)),
                  u(reinterpret_cast<std::uintptr_t>(a.key_cache)),
                  u(reinterpret_cast<std::uintptr_t>(a.value_cache)), u(a.key_stride_token),
                  u(a.key_stride_head), u(a.value_stride_token), u(a.value_stride_head),
                  u(a.kc_stride_block), u(a.kc_stride_token), u(a.kc_stride_head),
                  u(a.vc_stride_block), u(a.vc_stride_token), u(a.vc_stride_head)});
  a.words_per_row = int(row_bytes / width);
  const int per_token = a.num_heads * a.words_per_row;
  const int threads = std::min(256, std::max(32, (per_token + 31) / 32 * 32));
  const unsigned grid = unsigned(std::min<std::int64_t>(p.num_tokens, 1 << 30));
  const void* kernel = dispatch_copy_width(width, [](auto w) {
    return reinterpret_cast<const void*>(reshape_and_cache_kernel<decltype(w)::value>);
  });
  launch(kernel, dim3(grid), dim3(threads), 0, as_stream(stream), a, op,
         "reshape_and_cache_kernel");
  if (p.page_meta.data != nullptr) update_page_meta(p, stream);
}

void copy_blocks(const CopyBlocksParams& p, Stream stream) {
  DeviceGuard guard(p.device_index, "copy_blocks");
  if (p.src.wide) {
    copy_blocks_with<std::int64_t>(p, as_stream(stream));
  } else {
    copy_blocks_with<std::int32_t>(p, as_stream(stream));
  }
}

void swap_blocks(const SwapBlocksParams& p, Stream stream) {
  const char* op = "swap_blocks";
  const bool src_dev = p.src_device.type == DeviceType::CUDA;
  const bool dst_dev = p.dst_device.type == DeviceType::CUDA;
  DeviceGuard guard(src_dev ? p.src_device.index : p.dst_device.index, op);
  // Host memory must be page-locked: a copy from pageable memory would block the caller. Returns
  // the address through which this device reads and writes it, or null where it has none.
  auto pinned_device_address = [&](void* data, const char* name) {
    cudaPointerAttributes attr{};
    check(cudaPointerGetAttributes(&attr, data), op, "cudaPointerGetAttributes");
    if (attr.type != cudaMemoryTypeHost) {
      detail::fail(op, name,
                   " must be pinned (page-locked) host memory for a copy with a CUDA device, "
                   "got pageable memory");
    }
    return attr.devicePointer;
  };
  const char* src_base = static_cast<const char*>(p.src_cache.data);
  char* dst_base = static_cast<char*>(p.dst_cache.data);
  const void* src_mapped =
      src_dev ? src_base : pinned_device_address(p.src_cache.data, "src_cache");
  void* dst_mapped = dst_dev ? dst_base : pinned_device_address(p.dst_cache.data, "dst_cache");
  cudaStream_t s = as_stream(stream);
  if (src_mapped != nullptr && dst_mapped != nullptr) {
    // Pinned host memory under unified addressing is mapped: one kernel moves every block.
    const auto* src = static_cast<const char*>(src_mapped);
    auto* dst = static_cast<char*>(dst_mapped);
    if (std::max(p.src_cache.num_blocks, p.dst_cache.num_blocks) <= INT32_MAX) {
      swap_with_kernel<std::int32_t>(p, src, dst, s);
    } else {
      swap_with_kernel<std::int64_t>(p, src, dst, s);
    }
    return;
  }
  const std::int64_t block_bytes = p.src_cache.inner_numel * p.src_cache.elem_size;
  const std::int64_t src_stride = p.src_cache.stride_block * p.src_cache.elem_size;
  const std::int64_t dst_stride = p.dst_cache.stride_block * p.dst_cache.elem_size;
  // Host memory the device cannot address: copy calls, runs of consecutive ids on both sides as
  // one copy when blocks sit back to back.
  std::vector<void*> dsts;
  std::vector<const void*> srcs;
  std::vector<std::size_t> sizes;
  dsts.reserve(std::size_t(p.num_pairs));  // at most one run per pair: no regrowth in the loop
  srcs.reserve(std::size_t(p.num_pairs));
  sizes.reserve(std::size_t(p.num_pairs));
  for (std::int64_t i = 0; i < p.num_pairs;) {
    std::int64_t n = 1;
    if (src_stride == block_bytes && dst_stride == block_bytes) {
      while (i + n < p.num_pairs && p.src[i + n] == p.src[i] + n && p.dst[i + n] == p.dst[i] + n) {
        ++n;
      }
    }
    srcs.push_back(src_base + p.src[i] * src_stride);
    dsts.push_back(dst_base + p.dst[i] * dst_stride);
    sizes.push_back(std::size_t(n * block_bytes));
    i += n;
  }
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  if (s != nullptr) check(cudaStreamIsCapturing(s, &capture), op, "cudaStreamIsCapturing");
  if (s != nullptr && srcs.size() > 1 && capture == cudaStreamCaptureStatusNone) {
    // One driver call for the whole batch (not allowed on the legacy default stream; while the
    // stream is being captured into a graph, each run becomes its own copy node instead).
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    std::size_t attr_index = 0;
    cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), srcs.size(),
                                           &attr, &attr_index, 1, s);
    if (err == cudaSuccess) return;
    if (err != cudaErrorNotSupported && err != cudaErrorInvalidValue) {
      check(err, op, "cudaMemcpyBatchAsync");
    }
    cudaGetLastError();  // fall back to one call per run
  }
  for (std::size_t i = 0; i < srcs.size(); ++i) {
    check(cudaMemcpyAsync(dsts[i], srcs[i], sizes[i], cudaMemcpyDefault, s), op, "cudaMemcpyAsync");
  }
}

}  // namespace tinyserve::kernels::cuda
