// CPU cache writes and block copies.

#include <cstring>

#include "core/kernels.h"
#include "cpu/dtypes.h"
#include "cpu/page_meta.h"
#include "cpu/parallel.h"

namespace tinyserve::kernels::cpu {
namespace {

using tinyserve::cpu::parallel_for;

// Copies one block's elements between two block bases that share the inner layout `t`.
void copy_block(const BlockTensor& t, const char* src, char* dst) {
  if (t.dense) {
    std::memcpy(dst, src, std::size_t(t.inner_numel) * t.elem_size);
    return;
  }
  // Walk every inner index except the last (contiguous) dimension.
  const int last = t.inner_ndim - 1;
  const std::size_t row_bytes = std::size_t(t.inner_shape[last]) * t.elem_size;
  std::int64_t index[kMaxDims] = {};
  std::int64_t rows = 1;
  for (int d = 0; d < last; ++d) rows *= t.inner_shape[d];
  for (std::int64_t r = 0; r < rows; ++r) {
    std::int64_t offset = 0;
    for (int d = 0; d < last; ++d) offset += index[d] * t.inner_strides[d];
    std::memcpy(dst + offset * t.elem_size, src + offset * t.elem_size, row_bytes);
    for (int d = last - 1; d >= 0; --d) {
      if (++index[d] < t.inner_shape[d]) break;
      index[d] = 0;
    }
  }
}

char* block_base(const BlockTensor& t, std::int64_t block) {
  return static_cast<char*>(t.data) + block * t.stride_block * t.elem_size;
}

// Calls write(token, head, key cache offset, value cache offset) for every row of every token
// that has a slot, tokens spread over the threads.
template <class Write>
void for_each_cache_row(const ReshapeAndCacheParams& p, Write&& write) {
  parallel_for(p.num_tokens, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const std::int64_t slot = p.slot_mapping[i];
      if (slot < 0) continue;
      const std::int64_t block = slot / p.block_size, offset = slot % p.block_size;
      for (int h = 0; h < p.num_heads; ++h) {
        write(i, h, p.key_cache.offset(block, offset, h), p.value_cache.offset(block, offset, h));
      }
    }
  });
}

// Rows of T quantised into a float8 cache: stored = x / scale, rounded to nearest even and
// saturated (float32 division, the rounding the CUDA kernel makes too).
template <class T>
void quantise_rows(const ReshapeAndCacheParams& p) {
  using tinyserve::cpu::float8_e4m3_t;
  using tinyserve::cpu::quantise_e4m3;
  using tinyserve::cpu::to_float;
  auto quantise = [&](const void* src, std::int64_t src_offset, const CacheDesc& cache,
                      std::int64_t cache_offset, float scale) {
    const T* x = static_cast<const T*>(src) + src_offset;
    float8_e4m3_t* dst = static_cast<float8_e4m3_t*>(cache.data) + cache_offset;
    for (int d = 0; d < p.head_dim; ++d) dst[d] = quantise_e4m3(to_float(x[d]), scale);
  };
  for_each_cache_row(p, [&](std::int64_t i, int h, std::int64_t kc, std::int64_t vc) {
    quantise(p.key, i * p.key_stride_token + h * p.key_stride_head, p.key_cache, kc,
             p.k_scale.of(h));
    quantise(p.value, i * p.value_stride_token + h * p.value_stride_head, p.value_cache, vc,
             p.v_scale.of(h));
  });
}

}  // namespace

void reshape_and_cache(const ReshapeAndCacheParams& p) {
  if (p.cache_dtype == DType::Float8E4M3FN) {
    switch (p.dtype) {
      case DType::Float16:
        quantise_rows<tinyserve::cpu::half_t>(p);
        break;
      case DType::BFloat16:
        quantise_rows<tinyserve::cpu::bfloat16_t>(p);
        break;
      default:
        quantise_rows<float>(p);
        break;
    }
    if (p.page_meta.data != nullptr) update_page_meta(p);
    return;
  }
  const std::size_t elem = dtype_size(p.dtype);
  const std::size_t row_bytes = std::size_t(p.head_dim) * elem;
  for_each_cache_row(p, [&](std::int64_t i, int h, std::int64_t kc, std::int64_t vc) {
    std::memcpy(
        static_cast<char*>(p.key_cache.data) + kc * elem,
        static_cast<const char*>(p.key) + (i * p.key_stride_token + h * p.key_stride_head) * elem,
        row_bytes);
    std::memcpy(static_cast<char*>(p.value_cache.data) + vc * elem,
                static_cast<const char*>(p.value) +
                    (i * p.value_stride_token + h * p.value_stride_head) * elem,
                row_bytes);
  });
  if (p.page_meta.data != nullptr) update_page_meta(p);
}

void copy_blocks(const CopyBlocksParams& p) {
  const std::int64_t per_tensor = p.num_pairs;
  parallel_for(std::int64_t(p.tensors.size()) * per_tensor,
               [&](std::int64_t begin, std::int64_t end) {
                 for (std::int64_t i = begin; i < end; ++i) {
                   const BlockTensor& t = p.tensors[std::size_t(i / per_tensor)];
                   const std::int64_t pair = i % per_tensor;
                   copy_block(t, block_base(t, p.src[pair]), block_base(t, p.dst[pair]));
                 }
               });
}

void swap_blocks(const SwapBlocksParams& p) {
  parallel_for(p.num_pairs, [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      std::memcpy(block_base(p.dst_cache, p.dst[i]), block_base(p.src_cache, p.src[i]),
                  std::size_t(p.src_cache.inner_numel) * p.src_cache.elem_size);
    }
  });
}

}  // namespace tinyserve::kernels::cpu
