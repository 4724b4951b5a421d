// CachePool through its public C++ API on the CPU backend: views, grow/shrink with the kept blocks
// intact, exact accounting, copy_blocks over the pool's tensors, and rejected calls.

#include <tinyserve/tinyserve.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <vector>

#include "check.h"

namespace {

using tinyserve::CachePool;
using tinyserve::CachePoolConfig;
using tinyserve::TensorView;

CachePoolConfig config() {
  CachePoolConfig c;
  c.num_layers = 2;
  c.max_blocks = 100;
  c.block_size = 16;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.dtype = tinyserve::DType::Float32;
  c.page_meta = true;
  return c;
}

// The value stored at element i of block b of tensor t: distinct everywhere, never zero.
float pattern(int t, std::int64_t b, std::int64_t i) { return 1.0f + t * 1e5f + b * 1e3f + i; }

std::int64_t block_numel(const TensorView& v) { return v.shape[1] * v.shape[2] * v.shape[3]; }

// Blocks of NHD / page-summary tensors are dense runs of block_numel elements.
void fill(const std::vector<TensorView>& tensors, std::int64_t from, std::int64_t to) {
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    float* p = tensors[t].ptr<float>();
    for (std::int64_t b = from; b < to; ++b) {
      for (std::int64_t i = 0; i < block_numel(tensors[t]); ++i) {
        p[b * tensors[t].strides[0] + i] = pattern(int(t), b, i);
      }
    }
  }
}

bool holds(const std::vector<TensorView>& tensors, std::int64_t blocks) {
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const float* p = tensors[t].ptr<float>();
    for (std::int64_t b = 0; b < blocks; ++b) {
      for (std::int64_t i = 0; i < block_numel(tensors[t]); ++i) {
        if (p[b * tensors[t].strides[0] + i] != pattern(int(t), b, i)) return false;
      }
    }
  }
  return true;
}

std::size_t expected_mapped(const CachePool& pool, std::int64_t blocks) {
  const std::size_t g = pool.granule_bytes();
  const std::size_t kv = 16 * 2 * 32 * 4, meta = 2 * 2 * 32 * 4;
  auto granules = [&](std::size_t bytes) { return (bytes + g - 1) / g * g; };
  return 2 * (2 * granules(blocks * kv) + granules(blocks * meta));
}

void test_grow_shrink_and_views() {
  CachePool pool(config());
  CHECK(pool.granule_bytes() == std::size_t(sysconf(_SC_PAGESIZE)));
  CHECK(pool.num_blocks() == 0 && pool.mapped_bytes() == 0 && pool.num_tensors() == 6);
  pool.grow(60);
  pool.check();
  CHECK(pool.mapped_bytes() == expected_mapped(pool, 60));
  std::vector<TensorView> tensors = pool.tensors();
  CHECK(tensors.size() == 6 && tensors[0].shape[0] == 60 && tensors[2].shape[1] == 2);
  CHECK(tensors[0].data == pool.key(0).data && tensors[4].data == pool.value(1).data);
  CHECK(tensors[5].data == pool.page_meta(1).data);
  fill(tensors, 0, 60);
  pool.shrink(7);
  pool.check();
  CHECK(pool.mapped_bytes() == expected_mapped(pool, 7));
  CHECK(holds(pool.tensors(), 7));
  pool.grow(100);
  pool.check();
  CHECK(pool.tensors()[0].data == tensors[0].data);  // the base never moves
  CHECK(holds(pool.tensors(), 7));
  fill(pool.tensors(), 7, 100);
  CHECK(holds(pool.tensors(), 100));

  // one copy_blocks over every tensor of the pool
  std::vector<std::int32_t> src = {3, 90}, dst = {95, 1};
  tensors = pool.tensors();
  tinyserve::copy_blocks(tensors,
                         tinyserve::make_tensor(src.data(), tinyserve::DType::Int32, {}, {2}),
                         tinyserve::make_tensor(dst.data(), tinyserve::DType::Int32, {}, {2}));
  for (std::size_t t = 0; t < tensors.size(); ++t) {
    const float* p = tensors[t].ptr<float>();
    for (std::size_t k = 0; k < src.size(); ++k) {
      CHECK(p[dst[k] * tensors[t].strides[0] + 5] == pattern(int(t), src[k], 5));
    }
  }
}

void test_rejected_calls_change_nothing() {
  CachePool pool(config());
  pool.grow(10);
  fill(pool.tensors(), 0, 10);
  EXPECT_THROWS(pool.grow(9), std::invalid_argument);
  EXPECT_THROWS(pool.grow(101), std::invalid_argument);
  EXPECT_THROWS(pool.shrink(11), std::invalid_argument);
  EXPECT_THROWS(pool.key(2), std::invalid_argument);
  pool.check();
  CHECK(pool.num_blocks() == 10 && pool.mapped_bytes() == expected_mapped(pool, 10));
  CHECK(holds(pool.tensors(), 10));

  CachePoolConfig c = config();
  c.page_meta = false;
  CachePool plain(c);
  EXPECT_THROWS(plain.page_meta(0), std::invalid_argument);
  c.granule_bytes = 1000;
  EXPECT_THROWS(CachePool{c}, std::invalid_argument);
  c = config();
  c.num_layers = 0;
  EXPECT_THROWS(CachePool{c}, std::invalid_argument);
  c = config();
  c.device = {tinyserve::DeviceType::CUDAHost, 0};
  EXPECT_THROWS_WITH(CachePool{c}, std::invalid_argument,
                     "CachePool: device must be cpu or cuda, got cuda_host");
  c = config();
  c.dtype = tinyserve::DType::Int32;
  EXPECT_THROWS(CachePool{c}, std::invalid_argument);
  // Summaries: the caches' dtype or float8 over 16/32-bit caches; over float8 caches also any
  // of float16, bfloat16 and float32; never without page_meta.
  c = config();
  c.page_meta_dtype = tinyserve::DType::Float16;  // the caches are float32
  EXPECT_THROWS_WITH(CachePool{c}, std::invalid_argument,
                     "CachePool: page_meta_dtype must be the caches' dtype (float32) or "
                     "float8_e4m3fn, got float16");
  c.dtype = tinyserve::DType::Float8E4M3FN;
  CachePool float8(c);
  CHECK(float8.key(0).dtype == tinyserve::DType::Float8E4M3FN);
  CHECK(float8.page_meta(0).dtype == tinyserve::DType::Float16);
  c.page_meta_dtype = tinyserve::DType::Int8;
  EXPECT_THROWS_WITH(CachePool{c}, std::invalid_argument,
                     "CachePool: page_meta_dtype over float8_e4m3fn caches must be float16, "
                     "bfloat16, float32 or float8_e4m3fn, got int8");
  c.page_meta_dtype = tinyserve::DType::Float8E4M3FN;
  c.page_meta = false;
  EXPECT_THROWS_WITH(CachePool{c}, std::invalid_argument,
                     "CachePool: float8_e4m3fn page summaries need page_meta, got page_meta false");
  c = config();
  c.device = {tinyserve::DeviceType::CUDA, 64};
  EXPECT_THROWS(CachePool{c}, std::runtime_error);  // built without CUDA, or no such device
  // 2^21 x 2^21 x 2^22 x 2 bytes per block wraps size_t to 0: still past the 2^60-byte bound.
  c = config();
  c.max_blocks = 1;
  c.num_layers = 1;
  c.block_size = 1 << 21;
  c.num_kv_heads = 1 << 21;
  c.head_dim = 1 << 22;
  c.dtype = tinyserve::DType::Float16;
  EXPECT_THROWS(CachePool{c}, std::invalid_argument);
}

}  // namespace

int main() {
  test_grow_shrink_and_views();
  test_rejected_calls_change_nothing();
  return test::exit_code();
}
