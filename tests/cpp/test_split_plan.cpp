// The decode split planner (src/cuda/attention/split_plan.cu) run on the host, without a GPU:
// the CUDA runtime calls it makes (occupancy, cluster capacity, the shared-memory attribute)
// are answered here as an NVIDIA H200 answers them for the decode kernels (132 multiprocessors;
// CTAs a multiprocessor per kernel as cudaOccupancyMaxActiveBlocksPerMultiprocessor gives them
// there), so the plans below are the ones a user gets on that GPU. The planner's source is
// compiled into this test; it needs the CUDA headers only (no libcudart, no device).

#include <cstdint>
#include <map>
#include <vector>

#include "check.h"
#include "cuda/attention/split_plan.cu"

namespace {

std::map<const void*, int>& ctas_per_sm() {
  static std::map<const void*, int> m;
  return m;
}

}  // namespace

namespace tinyserve::kernels::cuda {
DeviceInfo device_info(int) {
  DeviceInfo d;
  d.multiprocessors = 132;
  d.compute_capability = 90;
  d.max_shared_per_block = 232448;
  return d;
}
}  // namespace tinyserve::kernels::cuda

extern "C" {
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void* kernel, int, size_t) {
  *n = ctas_per_sm().at(kernel);
  return cudaSuccess;
}
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void*) {
  *a = cudaFuncAttributes{};
  a->ptxVersion = 90;
  return cudaSuccess;
}
// No cluster fits: every split launch plans as through the merge kernel.
cudaError_t cudaOccupancyMaxActiveClusters(int* n, const void*, const cudaLaunchConfig_t*) {
  *n = 0;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "stub"; }
}

namespace {

using tinyserve::kernels::cuda::DecodeLaunch;
using tinyserve::kernels::cuda::plan_splits;
using tinyserve::kernels::cuda::plan_splits_for_lengths;
using tinyserve::kernels::cuda::SplitPlanShape;

// A decode kernel pair as the planner sees it: the unsplit and the split launch's kernels, with
// their CTAs a multiprocessor on an H200.
struct Kernels {
  int unsplit_id = 0, split_id = 0;
  DecodeLaunch unsplit, split;
  Kernels(int unsplit_ctas, int split_ctas) {
    unsplit = {&unsplit_id, 1024, 1024, 16, 128, false};
    split = {&split_id, 1024, 1024, 16, 128, false};
    ctas_per_sm()[&unsplit_id] = unsplit_ctas;
    ctas_per_sm()[&split_id] = split_ctas;
  }
};

// Lengths uniform in [1, hi] from a fixed linear congruential generator (the same on every
// standard library).
std::vector<std::int64_t> ragged(int n, std::int64_t hi, std::uint64_t seed) {
  std::vector<std::int64_t> lens(std::size_t(n), 0);
  std::uint64_t x = seed;
  for (auto& len : lens) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    len = 1 + std::int64_t((x >> 33) % std::uint64_t(hi));
  }
  return lens;
}

std::int64_t longest(const std::vector<std::int64_t>& lens) {
  std::int64_t m = 0;
  for (const std::int64_t len : lens) m = std::max(m, len);
  return m;
}

// 32 query / 8 KV heads, the decode kernels' 64-token minimum chunk.
int plan_lengths(const Kernels& k, const std::vector<std::int64_t>& lens) {
  const SplitPlanShape s{int(lens.size()), 32, 8, longest(lens), 64};
  return plan_splits_for_lengths(s, lens, 1, 64, k.unsplit, k.split, 0, "test");
}

int plan_equal(const Kernels& k, int batch, std::int64_t len) {
  const SplitPlanShape s{batch, 32, 8, len, 64};
  return plan_splits(s, k.unsplit, k.split, 0, "test");
}

}  // namespace

int main() {
  // float16 at head_dim 128: two CTAs a multiprocessor unsplit (three stages), three split (two).
  // Float8 caches at head_dim 128 run the same counts; at head_dim 64, two and five.
  const Kernels f16_128(2, 3), fp8_64(2, 5);

  // Equal lengths (docs/cuda.md): unsplit where the batch fills the GPU, else the count that
  // fills one wave of the split kernel; over host lengths, the same plan.
  CHECK(plan_equal(f16_128, 64, 4096) == 1);
  CHECK(plan_equal(f16_128, 256, 1024) == 1);
  CHECK(plan_equal(f16_128, 8, 32768) == 6);
  CHECK(plan_equal(f16_128, 1, 131072) == 49);
  CHECK(plan_lengths(f16_128, std::vector<std::int64_t>(8, 32768)) == 6);
  CHECK(plan_lengths(f16_128, std::vector<std::int64_t>(64, 4096)) == 1);
  // Between one and three waves of unsplit CTAs, each plan the fastest of 1-16 splits measured on
  // an H200 (float16 and float8 caches, head_dim 128): 56 and 80 sequences of 4,096 tokens
  // unsplit (the model that costed a partial wave as a full one planned 6 and 3 splits, 1-16%
  // slower), 48 and 72 in 2 splits.
  CHECK(plan_equal(f16_128, 56, 4096) == 1);
  CHECK(plan_equal(f16_128, 80, 4096) == 1);
  CHECK(plan_equal(f16_128, 48, 4096) == 2);
  CHECK(plan_equal(f16_128, 72, 4096) == 2);
  // Past one wave no count above the 16 measured is planned (50 x 262,144 would model 21).
  CHECK(plan_equal(f16_128, 50, 262144) == 16);

  // Ragged lengths (uniform in [1, hi]), each plan as measured fastest or near it on an H200.
  // 16 and 32 sequences of 1-8k tokens leave much of the GPU idle unsplit: they split (32
  // measured 10-19% faster split at head_dim 128 and over float8 caches at head_dim 64). 64 fill
  // it about twice, run longest first: unsplit (3 splits, planned before the split launch's slots
  // were scaled to their multiprocessor's share, ran 4% slower in float16, 13-15% over float8
  // caches), every draw for the head_dim-128 kernels and all but a few for float8 at head_dim 64
  // (five split CTAs a multiprocessor: some draws plan 3-5 splits). Between them, at head_dim
  // 128, 44 sequences plan 2 splits (44-52 ran 3-13% faster in 2 than unsplit and 5-12% faster
  // than in 3 or 4, where the planner before kLengthsCtaCostTokens planned 1-4). 24 of 1-4k
  // tokens split (14% faster in 2-3 splits than unsplit, which that planner, with a fixed cost
  // per split launch, chose in some draws). 128 of 1-4k tokens are near four waves and balance
  // themselves: not simulated, unsplit.
  int fp8_64_unsplit = 0;
  for (std::uint64_t seed = 1; seed <= 20; ++seed) {
    for (const Kernels* k : {&f16_128, &fp8_64}) {
      const int sixteen = plan_lengths(*k, ragged(16, 8191, seed));
      CHECK(sixteen >= 2 && sixteen <= 16);
      CHECK(plan_lengths(*k, ragged(32, 8191, seed)) > 1);
      CHECK(plan_lengths(*k, ragged(128, 4095, seed)) == 1);
    }
    CHECK(plan_lengths(f16_128, ragged(64, 8191, seed)) == 1);
    fp8_64_unsplit += plan_lengths(fp8_64, ragged(64, 8191, seed)) == 1;
    CHECK(plan_lengths(f16_128, ragged(44, 8191, seed)) == 2);
    CHECK(plan_lengths(f16_128, ragged(24, 4095, seed)) > 1);
  }
  CHECK(fp8_64_unsplit >= 18);
  // Where the split kernel runs as many CTAs a multiprocessor as the unsplit one (float16 at
  // head_dim 64, or 256), the scaling changes nothing: 24 sequences still split.
  const Kernels same(2, 2);
  CHECK(plan_lengths(same, ragged(24, 8191, 7)) > 1);
  // Per-KV-head lengths (a table selected by select_pages) plan too, within the bounds.
  const std::vector<std::int64_t> per_head = ragged(8 * 8, 2048, 3);
  const SplitPlanShape s{8, 32, 8, 2048, 64};
  const int p = plan_splits_for_lengths(s, per_head, 8, 64, f16_128.unsplit, f16_128.split, 0, "t");
  CHECK(p >= 1 && p <= 2048 / 64);

  // Which kernel a float8 split launch runs: the swapped MMAs at head_dim 256, and at head_dim 64
  // and 128 for chunks of at most 1,024 tokens; never unsplit or over 16-bit caches.
  using tinyserve::DType;
  using tinyserve::kernels::cuda::swap_split_launch;
  for (const int dim : {64, 128}) {
    CHECK(swap_split_launch(DType::Float8E4M3FN, dim, 4096, 4));
    CHECK(!swap_split_launch(DType::Float8E4M3FN, dim, 4097, 4));
    CHECK(swap_split_launch(DType::Float8E4M3FN, dim, 131072, 128));
    CHECK(!swap_split_launch(DType::Float8E4M3FN, dim, 32768, 6));
  }
  CHECK(swap_split_launch(DType::Float8E4M3FN, 256, 32768, 4));
  CHECK(!swap_split_launch(DType::Float8E4M3FN, 256, 32768, 1));
  CHECK(!swap_split_launch(DType::Float16, 128, 1024, 4));
  CHECK(!swap_split_launch(DType::BFloat16, 256, 32768, 4));
  return test::exit_code();
}
