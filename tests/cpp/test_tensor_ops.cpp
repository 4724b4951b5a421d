// The ops through the public C++ API on the CPU backend: results against a double-precision
// reference written here, error types across the library boundary, rejected calls writing
// nothing.

#include <tinyserve/tinyserve.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.h"

using tinyserve::Device;
using tinyserve::DeviceType;
using tinyserve::DType;
using tinyserve::make_tensor;

namespace {

const Device kCpu{DeviceType::CPU, 0};

void test_tensor_views() {
  float data[24];
  auto t = make_tensor(data, DType::Float32, kCpu, {2, 3, 4});
  CHECK(t.ndim == 3 && t.numel() == 24);
  CHECK(t.strides[0] == 12 && t.strides[1] == 4 && t.strides[2] == 1);
  auto u = tinyserve::transpose(t, 0, 1);
  CHECK(u.shape[0] == 3 && u.shape[1] == 2 && u.strides[0] == 4 && u.strides[1] == 12);
  CHECK(tinyserve::dtype_size(DType::BFloat16) == 2);
  CHECK(std::string(tinyserve::dtype_name(DType::Int64)) == "int64");
  EXPECT_THROWS(make_tensor(data, DType::Float32, kCpu, {1, 2, 3, 4, 5, 6, 7}),
                std::invalid_argument);
  EXPECT_THROWS_WITH(
      tinyserve::transpose(t, 0, 3), std::invalid_argument,
      "transpose: dimensions out of range for a tensor of 3 dimensions, got 0 and 3");
  EXPECT_THROWS_WITH(make_tensor(data, DType::Float32, kCpu, {2, 3}, {1}), std::invalid_argument,
                     "make_tensor: strides must match the shape's rank, got 1 strides for 2 "
                     "dimensions");
}

// Paged decode attention on one sequence: reference in double over the logical tokens.
void test_paged_attention_cpu() {
  std::mt19937 gen(1234);
  std::normal_distribution<float> normal;
  const int num_blocks = 7, block_size = 4, kv_heads = 2, q_heads = 6, dim = 16, len = 13;
  std::vector<float> k(num_blocks * block_size * kv_heads * dim), v(k.size());
  for (auto& x : k) x = normal(gen);
  for (auto& x : v) x = normal(gen);
  std::vector<float> q(q_heads * dim);
  for (auto& x : q) x = normal(gen);
  std::vector<std::int32_t> table = {5, 0, 3, 6};  // 4 pages cover 13 tokens
  std::vector<std::int32_t> lens = {len};
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(q_heads, std::numeric_limits<float>::quiet_NaN());

  auto kc = make_tensor(k.data(), DType::Float32, kCpu, {num_blocks, block_size, kv_heads, dim});
  auto vc = make_tensor(v.data(), DType::Float32, kCpu, {num_blocks, block_size, kv_heads, dim});
  tinyserve::AttentionOptions opts;
  opts.lse = make_tensor(lse.data(), DType::Float32, kCpu, {1, q_heads});
  tinyserve::paged_attention(make_tensor(q.data(), DType::Float32, kCpu, {1, q_heads, dim}), kc, vc,
                             make_tensor(table.data(), DType::Int32, kCpu, {1, 4}),
                             make_tensor(lens.data(), DType::Int32, kCpu, {1}),
                             make_tensor(out.data(), DType::Float32, kCpu, {1, q_heads, dim}),
                             opts);
  const int group = q_heads / kv_heads;
  double worst = 0.0, worst_lse = 0.0;
  for (int h = 0; h < q_heads; ++h) {
    const int kvh = h / group;
    std::vector<double> logits(len);
    double m = -INFINITY;
    for (int t = 0; t < len; ++t) {
      const float* krow =
          &k[((table[t / block_size] * block_size + t % block_size) * kv_heads + kvh) * dim];
      double s = 0.0;
      for (int d = 0; d < dim; ++d) s += double(q[h * dim + d]) * krow[d];
      logits[t] = s / std::sqrt(double(dim));
      m = std::max(m, logits[t]);
    }
    double denom = 0.0;
    std::vector<double> acc(dim, 0.0);
    for (int t = 0; t < len; ++t) {
      const double p = std::exp(logits[t] - m);
      denom += p;
      const float* vrow =
          &v[((table[t / block_size] * block_size + t % block_size) * kv_heads + kvh) * dim];
      for (int d = 0; d < dim; ++d) acc[d] += p * vrow[d];
    }
    for (int d = 0; d < dim; ++d) {
      worst = std::max(worst, std::abs(acc[d] / denom - out[h * dim + d]));
    }
    worst_lse = std::max(worst_lse, std::abs(m + std::log(denom) - lse[h]));
  }
  CHECK(worst < 1e-5);
  CHECK(worst_lse < 1e-5);

  // A block id out of range: std::invalid_argument, and nothing written.
  std::vector<float> before = out;
  table[2] = num_blocks;
  EXPECT_THROWS(
      tinyserve::paged_attention(make_tensor(q.data(), DType::Float32, kCpu, {1, q_heads, dim}), kc,
                                 vc, make_tensor(table.data(), DType::Int32, kCpu, {1, 4}),
                                 make_tensor(lens.data(), DType::Int32, kCpu, {1}),
                                 make_tensor(out.data(), DType::Float32, kCpu, {1, q_heads, dim})),
      std::invalid_argument);
  bool unchanged = true;
  for (std::size_t i = 0; i < out.size(); ++i) unchanged = unchanged && out[i] == before[i];
  CHECK(unchanged);
}

// Prefill through AttentionOptions::query_start_loc: sequence 0 attends its last 5 tokens of 13
// causally, sequence 1 is a decode row (its last token of 6), in one call.
void test_prefill_cpu() {
  std::mt19937 gen(99);
  std::normal_distribution<float> normal;
  const int num_blocks = 9, block_size = 4, kv_heads = 2, q_heads = 4, dim = 8;
  std::vector<float> k(num_blocks * block_size * kv_heads * dim), v(k.size());
  for (auto& x : k) x = normal(gen);
  for (auto& x : v) x = normal(gen);
  std::vector<std::int32_t> table = {5, 0, 3, 6, 8, 1, 2, 7};  // [2, 4]
  std::vector<std::int32_t> lens = {13, 6};
  std::vector<std::int32_t> starts = {0, 5, 6};
  const int rows = 6;
  std::vector<float> q(rows * q_heads * dim);
  for (auto& x : q) x = normal(gen);
  std::vector<float> out(q.size(), std::numeric_limits<float>::quiet_NaN());
  std::vector<float> lse(rows * q_heads, std::numeric_limits<float>::quiet_NaN());

  auto kc = make_tensor(k.data(), DType::Float32, kCpu, {num_blocks, block_size, kv_heads, dim});
  auto vc = make_tensor(v.data(), DType::Float32, kCpu, {num_blocks, block_size, kv_heads, dim});
  auto call = [&] {
    tinyserve::AttentionOptions opts;
    opts.lse = make_tensor(lse.data(), DType::Float32, kCpu, {rows, q_heads});
    opts.query_start_loc = make_tensor(starts.data(), DType::Int32, kCpu, {3});
    tinyserve::paged_attention(make_tensor(q.data(), DType::Float32, kCpu, {rows, q_heads, dim}),
                               kc, vc, make_tensor(table.data(), DType::Int32, kCpu, {2, 4}),
                               make_tensor(lens.data(), DType::Int32, kCpu, {2}),
                               make_tensor(out.data(), DType::Float32, kCpu, {rows, q_heads, dim}),
                               opts);
  };
  call();
  double worst = 0.0, worst_lse = 0.0;
  for (int r = 0; r < rows; ++r) {
    const int b = r < 5 ? 0 : 1;
    const int pos = b == 0 ? 13 - 5 + r : 5;  // the row's position: keys 0..pos
    const std::int32_t* pages = &table[b * 4];
    for (int h = 0; h < q_heads; ++h) {
      const int kvh = h / (q_heads / kv_heads);
      auto at = [&](const std::vector<float>& c, int t) {
        return &c[((pages[t / block_size] * block_size + t % block_size) * kv_heads + kvh) * dim];
      };
      std::vector<double> logits(pos + 1);
      double m = -INFINITY;
      for (int t = 0; t <= pos; ++t) {
        double s = 0.0;
        for (int d = 0; d < dim; ++d) s += double(q[(r * q_heads + h) * dim + d]) * at(k, t)[d];
        logits[t] = s / std::sqrt(double(dim));
        m = std::max(m, logits[t]);
      }
      double denom = 0.0;
      std::vector<double> acc(dim, 0.0);
      for (int t = 0; t <= pos; ++t) {
        const double p = std::exp(logits[t] - m);
        denom += p;
        for (int d = 0; d < dim; ++d) acc[d] += p * at(v, t)[d];
      }
      for (int d = 0; d < dim; ++d) {
        worst = std::max(worst, std::abs(acc[d] / denom - out[(r * q_heads + h) * dim + d]));
      }
      worst_lse = std::max(worst_lse, std::abs(m + std::log(denom) - lse[r * q_heads + h]));
    }
  }
  CHECK(worst < 1e-5);
  CHECK(worst_lse < 1e-5);

  // Decreasing offsets: std::invalid_argument, nothing written.
  std::vector<float> before = out;
  starts = {0, 6, 5};
  EXPECT_THROWS(call(), std::invalid_argument);
  bool unchanged = true;
  for (std::size_t i = 0; i < out.size(); ++i) unchanged = unchanged && out[i] == before[i];
  CHECK(unchanged);
}

void test_cache_ops_cpu() {
  const int n = 5, p = 2, h = 1, d = 4;
  std::vector<float> kc(n * p * h * d, -1.0f), vc(kc.size(), -1.0f);
  std::vector<float> key = {1, 2, 3, 4, 5, 6, 7, 8}, value = {9, 10, 11, 12, 13, 14, 15, 16};
  std::vector<std::int64_t> slots = {7, -1};
  auto kct = make_tensor(kc.data(), DType::Float32, kCpu, {n, p, h, d});
  auto vct = make_tensor(vc.data(), DType::Float32, kCpu, {n, p, h, d});
  tinyserve::reshape_and_cache(make_tensor(key.data(), DType::Float32, kCpu, {2, h, d}),
                               make_tensor(value.data(), DType::Float32, kCpu, {2, h, d}), kct, vct,
                               make_tensor(slots.data(), DType::Int64, kCpu, {2}));
  CHECK(kc[7 * d] == 1 && kc[7 * d + 3] == 4 && vc[7 * d] == 9);
  int written = 0;
  for (float x : kc) written += x != -1.0f;
  CHECK(written == d);  // the -1 slot was skipped

  std::vector<std::int32_t> src = {3}, dst = {1};
  tinyserve::copy_blocks({kct, vct}, make_tensor(src.data(), DType::Int32, kCpu, {1}),
                         make_tensor(dst.data(), DType::Int32, kCpu, {1}));
  CHECK(kc[1 * p * d + 1 * d] == 1 && vc[1 * p * d + 1 * d + 3] == 12);

  std::vector<float> host(2 * p * h * d, 0.0f);
  std::vector<std::int32_t> to = {1};
  tinyserve::swap_blocks(kct, make_tensor(host.data(), DType::Float32, kCpu, {2, p, h, d}),
                         make_tensor(src.data(), DType::Int32, kCpu, {1}),
                         make_tensor(to.data(), DType::Int32, kCpu, {1}));
  CHECK(host[p * d + d] == 1 && host[p * d + d + 3] == 4);

  // A slot past the cache: std::invalid_argument before any write.
  slots[1] = n * p;
  std::vector<float> before = kc;
  EXPECT_THROWS(
      tinyserve::reshape_and_cache(make_tensor(key.data(), DType::Float32, kCpu, {2, h, d}),
                                   make_tensor(value.data(), DType::Float32, kCpu, {2, h, d}), kct,
                                   vct, make_tensor(slots.data(), DType::Int64, kCpu, {2})),
      std::invalid_argument);
  CHECK(kc == before);
}

// A float8 cache: quantising writes (per-tensor K scale, per-head V scale in host memory) give
// the hand-computed e4m3 bits; attention over one token returns the dequantised value; a bad
// scale is refused before anything is written.
void test_fp8_cpu() {
  const int h = 1, d = 4, p = 2;
  std::vector<std::uint8_t> kc(2 * p * h * d, 0x7f), vc(2 * p * h * d, 0x7f);
  auto kct = make_tensor(kc.data(), DType::Float8E4M3FN, kCpu, {2, p, h, d});
  auto vct = make_tensor(vc.data(), DType::Float8E4M3FN, kCpu, {2, p, h, d});
  // Stored: K / 2 = {0.5, 1.0625 (a tie: 1), 500 (saturates to 448), -0.25}; V / 0.5.
  std::vector<float> key = {1.0f, 2.125f, 1000.0f, -0.5f}, value = {1.0f, 2.0f, -3.0f, 0.125f};
  std::vector<float> v_scales = {0.5f};
  std::vector<std::int64_t> slot = {2};  // block 1, offset 0
  tinyserve::CacheWriteOptions w;
  w.k_scale.value = 2.0f;
  w.v_scale.per_head = make_tensor(v_scales.data(), DType::Float32, kCpu, {1});
  auto k_in = make_tensor(key.data(), DType::Float32, kCpu, {1, h, d});
  auto v_in = make_tensor(value.data(), DType::Float32, kCpu, {1, h, d});
  auto slots = make_tensor(slot.data(), DType::Int64, kCpu, {1});
  tinyserve::CacheWriteOptions bad = w;
  bad.k_scale.value = -1.0f;
  EXPECT_THROWS(tinyserve::reshape_and_cache(k_in, v_in, kct, vct, slots, bad),
                std::invalid_argument);
  CHECK(kc == std::vector<std::uint8_t>(kc.size(), 0x7f));
  tinyserve::reshape_and_cache(k_in, v_in, kct, vct, slots, w);
  const std::size_t at = 2 * d;
  CHECK(kc[at] == 0x30 && kc[at + 1] == 0x38 && kc[at + 2] == 0x7e && kc[at + 3] == 0xa8);
  CHECK(vc[at] == 0x40 && vc[at + 1] == 0x48 && vc[at + 2] == 0xcc && vc[at + 3] == 0x28);

  std::vector<float> q = {0.3f, -0.2f, 0.1f, 0.4f}, out(d, NAN);
  std::vector<std::int32_t> table = {1, 0}, lens = {1};  // the one token: block 1, offset 0
  tinyserve::AttentionOptions o;
  o.k_scale.value = 2.0f;
  o.v_scale.per_head = w.v_scale.per_head;
  tinyserve::paged_attention(make_tensor(q.data(), DType::Float32, kCpu, {1, 1, d}),
                             make_tensor(kc.data(), DType::Float8E4M3FN, kCpu, {2, p, h, d}),
                             make_tensor(vc.data(), DType::Float8E4M3FN, kCpu, {2, p, h, d}),
                             make_tensor(table.data(), DType::Int32, kCpu, {1, 2}),
                             make_tensor(lens.data(), DType::Int32, kCpu, {1}),
                             make_tensor(out.data(), DType::Float32, kCpu, {1, 1, d}), o);
  CHECK(out[0] == 1.0f && out[1] == 2.0f && out[2] == -3.0f && out[3] == 0.125f);
}

// Block copies move bytes (any element type, int32 or int64 ids); a tensor that an op writes
// shares memory with no other tensor of the call.
void test_byte_copies_and_aliasing() {
  const int n = 6, row = 8;
  std::vector<std::int8_t> bytes(n * row);
  for (std::size_t i = 0; i < bytes.size(); ++i) bytes[i] = std::int8_t(i * 37);
  std::vector<std::uint8_t> flags(n * row);
  for (std::size_t i = 0; i < flags.size(); ++i) flags[i] = (i * 7) % 3 == 0;
  const std::vector<std::int8_t> bytes_before = bytes;
  const std::vector<std::uint8_t> flags_before = flags;
  std::vector<std::int64_t> src = {4, 0}, dst = {1, 5};
  tinyserve::copy_blocks({make_tensor(bytes.data(), DType::Int8, kCpu, {n, row}),
                          make_tensor(flags.data(), DType::Bool, kCpu, {n, row})},
                         make_tensor(src.data(), DType::Int64, kCpu, {2}),
                         make_tensor(dst.data(), DType::Int64, kCpu, {2}));
  bool copied = true;
  for (int b = 0; b < n; ++b) {
    const int from = b == 1 ? 4 : b == 5 ? 0 : b;
    for (int i = 0; i < row; ++i) {
      copied = copied && bytes[b * row + i] == bytes_before[from * row + i] &&
               flags[b * row + i] == flags_before[from * row + i];
    }
  }
  CHECK(copied);
  CHECK(std::string(tinyserve::dtype_name(DType::Float8E4M3FN)) == "float8_e4m3fn");
  CHECK(tinyserve::dtype_size(DType::Complex128) == 16);

  // One buffer as both caches, and ids of two widths: std::invalid_argument, nothing written.
  const int p = 2, h = 1, d = 4;
  std::vector<float> cache(n * p * h * d, -1.0f), key(h * d, 3.0f);
  std::int64_t slot = 2;
  auto ct = make_tensor(cache.data(), DType::Float32, kCpu, {n, p, h, d});
  EXPECT_THROWS(
      tinyserve::reshape_and_cache(make_tensor(key.data(), DType::Float32, kCpu, {1, h, d}),
                                   make_tensor(key.data(), DType::Float32, kCpu, {1, h, d}), ct, ct,
                                   make_tensor(&slot, DType::Int64, kCpu, {1})),
      std::invalid_argument);
  std::vector<std::int32_t> dst32 = {1, 5};
  EXPECT_THROWS(tinyserve::copy_blocks({ct}, make_tensor(src.data(), DType::Int64, kCpu, {2}),
                                       make_tensor(dst32.data(), DType::Int32, kCpu, {2})),
                std::invalid_argument);
  EXPECT_THROWS(tinyserve::copy_blocks({ct, ct}, make_tensor(src.data(), DType::Int64, kCpu, {2}),
                                       make_tensor(dst.data(), DType::Int64, kCpu, {2})),
                std::invalid_argument);
  bool untouched = true;
  for (float x : cache) untouched = untouched && x == -1.0f;
  CHECK(untouched);
}

void test_backend_errors() {
  // A tensor on a CUDA device: built without CUDA, or no such device here: std::runtime_error.
  // Four separate buffers: only the device is wrong, so no other check can answer first.
  float key[4], value[4], key_cache[4], value_cache[4];
  const Device gpu{DeviceType::CUDA, 7};
  std::int64_t slot = 0;
  bool raised = false;
  try {
    tinyserve::reshape_and_cache(make_tensor(key, DType::Float32, gpu, {1, 1, 4}),
                                 make_tensor(value, DType::Float32, gpu, {1, 1, 4}),
                                 make_tensor(key_cache, DType::Float32, gpu, {1, 1, 1, 4}),
                                 make_tensor(value_cache, DType::Float32, gpu, {1, 1, 1, 4}),
                                 make_tensor(&slot, DType::Int64, gpu, {1}));
  } catch (const std::invalid_argument&) {
  } catch (const std::runtime_error& e) {
    raised = std::string(e.what()).find("tinyserve.reshape_and_cache") == 0;
  }
  CHECK(raised || tinyserve::cuda_device_count() > 7);
  CHECK(tinyserve::cuda_compiled() || tinyserve::cuda_device_count() == 0);
  CHECK(tinyserve::num_threads() >= 1);
  EXPECT_THROWS(tinyserve::set_num_threads(0), std::invalid_argument);
}

}  // namespace

int main() {
  test_tensor_views();
  test_paged_attention_cpu();
  test_prefill_cpu();
  test_cache_ops_cpu();
  test_fp8_cpu();
  test_byte_copies_and_aliasing();
  test_backend_errors();
  return test::exit_code();
}
