// Page summaries and select_pages through the public C++ API on the CPU backend: summaries
// against values computed here (of a float8 cache too, through the overloads that take its
// scale), the selected pages against a ranking computed here, and a rejected call writing
// nothing.

#include <tinyserve/tinyserve.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "check.h"

using tinyserve::Device;
using tinyserve::DeviceType;
using tinyserve::DType;
using tinyserve::make_tensor;

namespace {

const Device kCpu{DeviceType::CPU, 0};
constexpr int kBlocks = 8, kPage = 4, kHeads = 1, kDim = 3;

void test_summaries_and_selection() {
  std::mt19937 gen(7);
  std::normal_distribution<float> normal;
  // One sequence of 30 tokens on blocks 7, 6, ..., 0 (8 pages, the last holding 2 tokens).
  const int len = 30;
  std::vector<float> k(std::size_t(len) * kHeads * kDim), kc(kBlocks * kPage * kHeads * kDim);
  std::vector<float> vc(kc.size());
  for (auto& x : k) x = normal(gen);
  std::vector<std::int32_t> table(kBlocks);
  std::iota(table.rbegin(), table.rend(), 0);
  std::vector<std::int64_t> slots(len);
  for (int t = 0; t < len; ++t) slots[t] = std::int64_t(table[t / kPage]) * kPage + t % kPage;
  std::vector<float> meta(kBlocks * kHeads * 2 * kDim, std::nanf(""));
  auto key = make_tensor(k.data(), DType::Float32, kCpu, {len, kHeads, kDim});
  auto cache = make_tensor(kc.data(), DType::Float32, kCpu, {kBlocks, kPage, kHeads, kDim});
  auto v_cache = make_tensor(vc.data(), DType::Float32, kCpu, {kBlocks, kPage, kHeads, kDim});
  auto meta_view = make_tensor(meta.data(), DType::Float32, kCpu, {kBlocks, kHeads, 2, kDim});
  // The default summary: min/max rows (DESIGN.md).
  tinyserve::reshape_and_cache(key, key, cache, v_cache,
                               make_tensor(slots.data(), DType::Int64, kCpu, {len}), meta_view);
  for (int page = 0; page < kBlocks; ++page) {
    for (int d = 0; d < kDim; ++d) {
      float lo = INFINITY, hi = -INFINITY;
      for (int t = page * kPage; t < std::min(len, (page + 1) * kPage); ++t) {
        lo = std::min(lo, k[std::size_t(t) * kDim + d]);
        hi = std::max(hi, k[std::size_t(t) * kDim + d]);
      }
      const int block = table[page];
      CHECK(meta[std::size_t(block) * 2 * kDim + d] == lo);
      CHECK(meta[std::size_t(block) * 2 * kDim + kDim + d] == hi);
    }
  }

  // Budget 3: the best of pages 0..6 by Quest's bound for a 2-head group (scores summed), then
  // the last page.
  std::vector<float> q(2 * kDim);
  for (auto& x : q) x = normal(gen);
  std::vector<std::pair<double, int>> ranked;
  for (int page = 0; page < kBlocks - 1; ++page) {
    double score = 0;
    for (int g = 0; g < 2; ++g) {
      for (int d = 0; d < kDim; ++d) {
        const double qd = q[std::size_t(g) * kDim + d];
        const float* row = &meta[std::size_t(table[page]) * 2 * kDim];
        score += std::max(qd * row[d], qd * row[kDim + d]);
      }
    }
    ranked.push_back({-score, page});
  }
  std::sort(ranked.begin(), ranked.end());
  std::vector<int> want = {ranked[0].second, ranked[1].second};
  std::sort(want.begin(), want.end());
  std::vector<std::int32_t> out_table(3, -7), out_lens(1, -7), lens = {len};
  tinyserve::SelectPagesOptions options;  // the defaults: Quest's bound, the group summed
  auto query = make_tensor(q.data(), DType::Float32, kCpu, {1, 2, kDim});
  auto dense = make_tensor(table.data(), DType::Int32, kCpu, {1, kBlocks});
  auto dense_lens = make_tensor(lens.data(), DType::Int32, kCpu, {1});
  auto sel = make_tensor(out_table.data(), DType::Int32, kCpu, {1, kHeads, 3});
  auto sel_lens = make_tensor(out_lens.data(), DType::Int32, kCpu, {1, kHeads});
  tinyserve::select_pages(query, meta_view, dense, dense_lens, 3, kPage, sel, sel_lens, options);
  CHECK(out_table[0] == table[want[0]] && out_table[1] == table[want[1]]);
  CHECK(out_table[2] == table[kBlocks - 1]);
  CHECK(out_lens[0] == 2 * kPage + 2);

  // Rejected (budget 0): nothing written.
  std::fill(out_table.begin(), out_table.end(), -7);
  out_lens[0] = -7;
  EXPECT_THROWS(tinyserve::select_pages(query, meta_view, dense, dense_lens, 0, kPage, sel,
                                        sel_lens, options),
                std::invalid_argument);
  CHECK(out_lens[0] == -7 && out_table[0] == -7);
  // Enum values outside the declared ones (the C++ API takes any integer cast to them).
  tinyserve::SelectPagesOptions bad_summary = options;
  bad_summary.summary = static_cast<tinyserve::PageSummary>(9);
  EXPECT_THROWS_WITH(tinyserve::select_pages(query, meta_view, dense, dense_lens, 3, kPage, sel,
                                             sel_lens, bad_summary),
                     std::invalid_argument,
                     "select_pages: summary must be MinMax, MeanStd or MinMaxDamped, got 9");
  tinyserve::SelectPagesOptions bad_reduce = options;
  bad_reduce.group_reduce = static_cast<tinyserve::GroupReduce>(5);
  EXPECT_THROWS_WITH(tinyserve::select_pages(query, meta_view, dense, dense_lens, 3, kPage, sel,
                                             sel_lens, bad_reduce),
                     std::invalid_argument, "select_pages: group_reduce must be Sum or Max, got 5");
  CHECK(out_lens[0] == -7 && out_table[0] == -7);
}

// The value of float8 e4m3fn bits (no NaN among the bits this test produces).
float e4m3_value(std::uint8_t bits) {
  const int exponent = (bits >> 3) & 0xF, mantissa = bits & 0x7;
  const float magnitude = exponent == 0 ? std::ldexp(float(mantissa) / 8.0f, -6)
                                        : std::ldexp(1.0f + float(mantissa) / 8.0f, exponent - 7);
  return (bits & 0x80) ? -magnitude : magnitude;
}

// A float8 cache's summaries (float32 here) are of its keys as stored times k_scale: the writes'
// and build_page_meta's, both equal to the min/max computed here from the cache's bytes.
void test_float8_cache_summaries() {
  std::mt19937 gen(11);
  std::normal_distribution<float> normal;
  const int len = 10;
  const float scale = 0.03f;
  std::vector<float> k(std::size_t(len) * kHeads * kDim);
  for (auto& x : k) x = 2.0f * normal(gen);
  std::vector<std::uint8_t> kc(kBlocks * kPage * kHeads * kDim, 0x7F), vc(kc.size(), 0x7F);
  std::vector<std::int64_t> slots(len);
  for (int t = 0; t < len; ++t) slots[t] = t;  // blocks 0, 1 and half of 2
  std::vector<float> meta(kBlocks * kHeads * 2 * kDim, std::nanf(""));
  auto key = make_tensor(k.data(), DType::Float32, kCpu, {len, kHeads, kDim});
  auto cache = make_tensor(kc.data(), DType::Float8E4M3FN, kCpu, {kBlocks, kPage, kHeads, kDim});
  auto v_cache = make_tensor(vc.data(), DType::Float8E4M3FN, kCpu, {kBlocks, kPage, kHeads, kDim});
  auto meta_view = make_tensor(meta.data(), DType::Float32, kCpu, {kBlocks, kHeads, 2, kDim});
  tinyserve::CacheWriteOptions options;
  options.k_scale.value = scale;
  options.v_scale.value = scale;
  tinyserve::reshape_and_cache(key, key, cache, v_cache,
                               make_tensor(slots.data(), DType::Int64, kCpu, {len}), options,
                               meta_view);
  auto check = [&](const std::vector<float>& got) {
    for (int block = 0; block < 3; ++block) {
      for (int d = 0; d < kDim; ++d) {
        float lo = INFINITY, hi = -INFINITY;
        for (int t = block * kPage; t < std::min(len, (block + 1) * kPage); ++t) {
          const float x = e4m3_value(kc[std::size_t(t) * kDim + d]) * scale;
          lo = std::min(lo, x);
          hi = std::max(hi, x);
        }
        CHECK(got[std::size_t(block) * 2 * kDim + d] == lo);
        CHECK(got[std::size_t(block) * 2 * kDim + kDim + d] == hi);
      }
    }
    CHECK(std::isnan(got[3 * 2 * kDim]));  // a block never written
  };
  check(meta);
  std::vector<float> built(meta.size(), std::nanf(""));
  std::vector<std::int32_t> table = {0, 1, 2}, lens = {len};
  tinyserve::KVScale k_scale;
  k_scale.value = scale;
  tinyserve::build_page_meta(
      cache, make_tensor(table.data(), DType::Int32, kCpu, {1, 3}),
      make_tensor(lens.data(), DType::Int32, kCpu, {1}),
      make_tensor(built.data(), DType::Float32, kCpu, {kBlocks, kHeads, 2, kDim}), k_scale);
  check(built);
  // Summaries of another dtype than the keys written: refused, nothing written.
  std::vector<std::uint16_t> half(meta.size(), 0x7E00);
  EXPECT_THROWS_WITH(
      tinyserve::reshape_and_cache(
          key, key, cache, v_cache, make_tensor(slots.data(), DType::Int64, kCpu, {len}), options,
          make_tensor(half.data(), DType::Float16, kCpu, {kBlocks, kHeads, 2, kDim})),
      std::invalid_argument, "page_meta must have the dtype of the keys written (float32)");
  CHECK(std::all_of(half.begin(), half.end(), [](std::uint16_t h) { return h == 0x7E00; }));
}

}  // namespace

int main() {
  test_summaries_and_selection();
  test_float8_cache_summaries();
  return test::exit_code();
}
