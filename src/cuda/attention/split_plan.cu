// The split planner and the occupancy cache (see split_plan.cuh).

#include <algorithm>
#include <mutex>
#include <vector>

#include "cuda/attention/split_plan.cuh"
#include "cuda/common.cuh"

namespace tinyserve::kernels::cuda {
namespace {

constexpr std::int64_t kMaxPlannedSplits = 1024;
constexpr double kSplitOverheadTokens = 128.0;  // per-CTA fixed cost, in tokens of streaming

}  // namespace

int prepare_launch(const DecodeLaunch& l, int device, const char* op) {
  struct Entry {
    const void* kernel;
    int device, smem, ctas;
  };
  struct Raised {  // a kernel whose limit is raised on a device
    const void* kernel;
    int device;
  };
  static std::mutex mutex;
  static std::vector<Entry> prepared;
  static std::vector<Raised> raised;
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : prepared) {
    if (e.kernel == l.kernel && e.device == device && e.smem == l.smem_bytes) return e.ctas;
  }
  // The limit is one attribute per kernel, so it is never lowered for a smaller launch.
  const bool is_raised = std::any_of(raised.begin(), raised.end(), [&](const Raised& r) {
    return r.kernel == l.kernel && r.device == device;
  });
  if (!is_raised) {
    check(cudaFuncSetAttribute(l.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               l.max_smem_bytes),
          op, "cudaFuncSetAttribute");
    raised.push_back({l.kernel, device});
  }
  int ctas = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, l.kernel, l.threads, l.smem_bytes), op,
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  ctas = std::max(ctas, 1);
  prepared.push_back({l.kernel, device, l.smem_bytes, ctas});
  return ctas;
}

int plan_splits(const SplitPlanShape& s, const DecodeLaunch& unsplit, const DecodeLaunch& split,
                int device, const char* op) {
  const int group = s.num_q_heads / s.num_kv_heads;
  const std::int64_t max_splits =
      std::clamp<std::int64_t>(s.max_kv_len / s.min_split_tokens, 1, kMaxPlannedSplits);
  // The cheapest split count for one kernel. Cost of n splits for equal-length sequences: the
  // waves of CTAs it takes, times each CTA's work (its chunk of tokens plus a fixed cost, about
  // two tiles of pipeline fill, that every CTA and every split's merge pays). The cheapest n
  // wins; ties go to fewer splits.
  auto best_splits = [&](const DecodeLaunch& l) {
    const std::int64_t units =
        std::int64_t(s.batch) * s.num_kv_heads * ((group + l.heads_per_cta - 1) / l.heads_per_cta);
    const std::int64_t slots =
        std::int64_t(device_info(device).multiprocessors) * prepare_launch(l, device, op);
    auto cost = [&](std::int64_t n) {
      const std::int64_t waves = (units * n + slots - 1) / slots;
      return double(waves) * (double(s.max_kv_len) / double(n) + kSplitOverheadTokens);
    };
    std::int64_t best = 1;
    double best_cost = cost(1);
    for (std::int64_t n = 2; n <= max_splits; ++n) {
      const double c = cost(n);
      if (c < best_cost) best = n, best_cost = c;
    }
    return best;
  };
  // Split only where the unsplit kernel would leave the GPU short of work; the split count is
  // then planned for the kernel that split launches use, where that is another kernel.
  const std::int64_t unsplit_best = best_splits(unsplit);
  if (unsplit_best == 1 || split.kernel == unsplit.kernel) return int(unsplit_best);
  return int(best_splits(split));
}

}  // namespace tinyserve::kernels::cuda
