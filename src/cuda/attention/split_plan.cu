// The split planner and the occupancy cache (see split_plan.cuh).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <iterator>
#include <mutex>
#include <queue>
#include <vector>

#include "cuda/attention/split_plan.cuh"
#include "cuda/common.cuh"

namespace tinyserve::kernels::cuda {
namespace {

constexpr std::int64_t kMaxPlannedSplits = 1024;
constexpr double kSplitOverheadTokens = 128.0;  // per-CTA fixed cost, in tokens of streaming
// What merging in clusters saves a split launch that fits (plan_splits): the merge launch, the
// partials' writes and reads, in the same tokens (set so that, on an H200, the 2,048-token
// tables of sparse decode plan 4 splits in clusters at 8 x 32k and 8 at 1 x 128k, which measured
// faster than 6 and 32 through the merge kernel).
constexpr double kClusterMergeSavingTokens = 2.0 * kSplitOverheadTokens;

// Planning over known lengths (plan_splits_for_lengths): each CTA of the simulated schedule costs
// its chunk plus this fixed cost, in tokens of streaming (its pipeline's fill and drain, its
// output, and for a split CTA its partial and its share of the merge). Fitted, with the slot
// scaling below, to the times of 48 ragged batches measured at fixed split counts on an H200
// (16-64 sequences of 1-8k tokens; float16 and float8 caches; head_dim 64, 128 and 256), and
// checked on 48 others (24-80 sequences of 1-4k and 1-16k tokens): there its plans cost 1.2%
// more than the fastest count on average, 10% at most (the costs before it, 128 tokens a CTA,
// 2,048 a split launch and the slot ratio to the power 0.75: 4.0% and 21%).
constexpr double kLengthsCtaCostTokens = 3.0 * kSplitOverheadTokens;
// plan_splits over more CTAs than one wave of the unsplit kernel: a partial last wave costs at
// least this share of a full one, and no count above kMaxSharedWaveSplits (the most it was
// checked at) is considered. Fitted to
// float8 batches of 40-96 sequences of 4,096 tokens at head_dim 128 on an H200, then checked on an
// H200 against the fastest of 1-16 splits over 208 batches of 20-256 sequences (1-16k tokens,
// equal and spread lengths, float16, bfloat16 and float8 caches, head_dim 64-256): the plans cost
// 0.9% more than the fastest on average over 120 batches at head_dim 128 (9% at most) and 1.5%
// over 88 others, where the model that costed a partial wave as a full one cost 2.4% (27% at
// most) and 4.0%. (The worst of the 88, 57% in 3 splits, is a batch under one wave, which this
// rule leaves as it was.)
constexpr double kPartialWaveFloor = 0.65;
constexpr std::int64_t kMaxSharedWaveSplits = 16;
// Counts simulated beyond 1; a longer count comes only from plan_splits (equal-length model).
constexpr std::int64_t kSimulatedSplits[] = {2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16};
// A launch of at least this many waves of unsplit CTAs balances itself: planned as plan_splits
// (on an H200, 128 sequences of 1-4k tokens ran 5-8% slower split in 3 than unsplit).
constexpr std::int64_t kBalancedWaves = 3;
// No schedule simulates more CTAs than this (host time).
constexpr std::int64_t kMaxSimulatedCtas = std::int64_t(1) << 16;

// When `slots` CTA slots, each taking the next CTA of the launch as it frees, finish the launch
// (in tokens streamed per slot): the CTAs go in launch order (the sequences in `order`, then
// split, KV head), `units` of each (sequence, split, length entry), each its chunk (cut as
// split_range cuts it) plus kLengthsCtaCostTokens; a CTA whose chunk is empty exits at once and is
// not counted. The `units` equal CTAs of an entry take `units` slots freed together, so they are
// scheduled as one job on slots / units groups of slots (the host time of a plan: 8x fewer steps at
// 8 KV heads).
double greedy_finish(const std::vector<std::int64_t>& lens, const std::vector<std::size_t>& order,
                     int lens_per_head, std::int64_t units, std::int64_t splits, int align,
                     std::int64_t slots) {
  std::priority_queue<double, std::vector<double>, std::greater<double>> free_at;
  for (std::int64_t i = 0; i < std::max<std::int64_t>(1, slots / units); ++i) free_at.push(0.0);
  double finish = 0.0;
  for (const std::size_t b : order) {
    for (std::int64_t sp = 0; sp < splits; ++sp) {
      for (int h = 0; h < lens_per_head; ++h) {
        const std::int64_t len = lens[b * std::size_t(lens_per_head) + std::size_t(h)];
        std::int64_t chunk = (len + splits - 1) / splits;
        chunk = (chunk + align - 1) / align * align;
        const std::int64_t begin = std::min(len, sp * chunk);
        const std::int64_t end = std::min(len, begin + chunk);
        if (end <= begin) continue;
        const double done = free_at.top() + double(end - begin) + kLengthsCtaCostTokens;
        free_at.pop();
        free_at.push(done);
        finish = std::max(finish, done);
      }
    }
  }
  return finish;
}

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

namespace {

// The CTAs a launch of l runs side by side: multiprocessors x CTAs per multiprocessor.
std::int64_t launch_slots(const DecodeLaunch& l, int device, const char* op) {
  return std::int64_t(device_info(device).multiprocessors) * prepare_launch(l, device, op);
}

// The CTAs of l per KV head (the head tiles of a GQA group).
std::int64_t head_tiles(const SplitPlanShape& s, const DecodeLaunch& l) {
  const int group = s.num_q_heads / s.num_kv_heads;
  return (group + l.heads_per_cta - 1) / l.heads_per_cta;
}

// The most splits a key range of max_kv_len allows.
std::int64_t max_split_count(const SplitPlanShape& s) {
  return std::clamp<std::int64_t>(s.max_kv_len / s.min_split_tokens, 1, kMaxPlannedSplits);
}

}  // namespace

bool cluster_launch_fits(const DecodeLaunch& l, int device, int splits, std::int64_t clusters,
                         const char* op) {
  if (!l.cluster_merge || splits < 2 || splits > kMaxClusterSplits ||
      device_info(device).compute_capability < 90) {
    return false;
  }
  struct Entry {
    const void* kernel;
    int device, splits, smem, capacity;
  };
  static std::mutex mutex;
  static std::vector<Entry> known;
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const Entry& e : known) {
      if (e.kernel == l.kernel && e.device == device && e.splits == splits &&
          e.smem == l.smem_bytes) {
        return clusters <= e.capacity;
      }
    }
  }
  // launch_slots prepares the kernel (its shared-memory limit, which the query needs).
  const std::int64_t slots = launch_slots(l, device, op);
  cudaFuncAttributes attributes{};
  check(cudaFuncGetAttributes(&attributes, l.kernel), op, "cudaFuncGetAttributes");
  int capacity = 0;
  if (attributes.ptxVersion >= 90) {
    LaunchConfig c(dim3(1, unsigned(splits), 1), dim3(unsigned(l.threads)),
                   std::size_t(l.smem_bytes), nullptr, cluster_y_attribute(splits));
    check(cudaOccupancyMaxActiveClusters(&capacity, l.kernel, &c.config), op,
          "cudaOccupancyMaxActiveClusters");
  }
  // Clusters that fill every slot of the device (two CTAs each, say) lose nothing to their
  // placement, however many waves the launch takes: as if every cluster fitted at once.
  if (std::int64_t(capacity) * splits >= slots) capacity = INT32_MAX;
  std::lock_guard<std::mutex> lock(mutex);
  known.push_back({l.kernel, device, splits, l.smem_bytes, capacity});
  return clusters <= capacity;
}

bool longest_first(const SplitPlanShape& s, bool one_length_per_sequence,
                   const DecodeLaunch& unsplit, int device, const char* op) {
  return one_length_per_sequence && s.batch >= 2 && s.batch <= kLongestFirstMaxBatch &&
         std::int64_t(s.batch) * s.num_kv_heads * head_tiles(s, unsplit) <
             kBalancedWaves * launch_slots(unsplit, device, op);
}

int plan_splits(const SplitPlanShape& s, const DecodeLaunch& unsplit, const DecodeLaunch& split,
                int device, const char* op, const DecodeLaunch* clustered) {
  const std::int64_t max_splits = max_split_count(s);
  // The CTAs a split of each kernel takes, and the kernel's slots (the split kernel's are asked
  // for only where a split is costed).
  const std::int64_t units1 = std::int64_t(s.batch) * s.num_kv_heads * head_tiles(s, unsplit);
  const std::int64_t slots1 = launch_slots(unsplit, device, op);
  const std::int64_t units_n = std::int64_t(s.batch) * s.num_kv_heads * head_tiles(s, split);
  // The cheapest split count for a kernel of `slots` slots whose splits take `units` CTAs each.
  // Cost of n splits for equal-length sequences: the waves of CTAs it takes, times each CTA's
  // work (its chunk of tokens plus a fixed cost, about two tiles of pipeline fill, that every CTA
  // and every split's merge pays); with `c`, a count whose launch merges in clusters
  // (cluster_launch_fits) costs kClusterMergeSavingTokens less. The cheapest n wins; ties go to
  // fewer splits.
  auto best_splits = [&](std::int64_t units, std::int64_t slots, const DecodeLaunch* c) {
    auto cost = [&](std::int64_t n) {
      const std::int64_t waves = (units * n + slots - 1) / slots;
      const double unfused =
          double(waves) * (double(s.max_kv_len) / double(n) + kSplitOverheadTokens);
      const bool fused = c != nullptr && cluster_launch_fits(*c, device, int(n), units, op);
      return fused ? unfused - kClusterMergeSavingTokens : unfused;
    };
    std::int64_t best = 1;
    double best_cost = cost(1);
    for (std::int64_t n = 2; n <= max_splits; ++n) {
      const double cn = cost(n);
      if (cn < best_cost) best = n, best_cost = cn;
    }
    return best;
  };
  // More CTAs than one wave of the unsplit kernel: the last wave's CTAs share the bandwidth the
  // others leave, so a partial wave costs its share of a full one, but no less than
  // kPartialWaveFloor of it (a CTA streams only so fast alone); a split launch's waves are
  // scaled by its slots over the unsplit kernel's (a slot streams its share of a
  // multiprocessor), and each CTA costs its chunk plus kLengthsCtaCostTokens.
  if (units1 > slots1) {
    const std::int64_t slots_n = launch_slots(split, device, op);
    // n splits of `units` CTAs each on `slots` slots.
    auto cost = [&](std::int64_t units, std::int64_t slots, std::int64_t n) {
      const double x = double(units * n) / double(slots);
      const double full = std::floor(x), part = x - full;
      const double waves = full + (part > 0.0 ? std::max(part, kPartialWaveFloor) : 0.0);
      return waves * (double(s.max_kv_len) / double(n) + kLengthsCtaCostTokens) *
             (double(slots) / double(slots1));
    };
    std::int64_t best = 1;
    double best_cost = cost(units1, slots1, 1);
    for (std::int64_t n = 2; n <= std::min<std::int64_t>(max_splits, kMaxSharedWaveSplits); ++n) {
      const double cn = cost(units_n, slots_n, n);
      if (cn < best_cost) best = n, best_cost = cn;
    }
    return int(best);
  }
  // Split only where the unsplit kernel would leave the GPU short of work (merges not counted);
  // the split count is then planned for the kernel that split launches use.
  const std::int64_t unsplit_best = best_splits(units1, slots1, nullptr);
  if (unsplit_best == 1 || (split.kernel == unsplit.kernel && clustered == nullptr)) {
    return int(unsplit_best);
  }
  return int(best_splits(units_n, launch_slots(split, device, op), clustered));
}

int plan_splits_for_lengths(const SplitPlanShape& s, const std::vector<std::int64_t>& lens,
                            int lens_per_head, int align, const DecodeLaunch& unsplit,
                            const DecodeLaunch& split, int device, const char* op,
                            const DecodeLaunch* clustered) {
  if (lens.empty()) return plan_splits(s, unsplit, split, device, op, clustered);
  const auto [lo, hi] = std::minmax_element(lens.begin(), lens.end());
  SplitPlanShape longest = s;
  longest.max_kv_len = std::min(s.max_kv_len, *hi);
  const int equal_plan = plan_splits(longest, unsplit, split, device, op, clustered);
  if (*lo == *hi) return equal_plan;
  const std::int64_t entries = std::int64_t(lens.size());
  // CTAs per length entry, and the slots, of the unsplit and the split launch.
  const std::int64_t per_entry = s.num_kv_heads / lens_per_head;
  const std::int64_t units1 = per_entry * head_tiles(s, unsplit);
  const std::int64_t units_n = per_entry * head_tiles(s, split);
  const std::int64_t slots1 = launch_slots(unsplit, device, op);
  const std::int64_t slots_n = launch_slots(split, device, op);
  if (entries * units1 >= kBalancedWaves * slots1) return equal_plan;
  // The sequences in launch order: by length, longest first (ties by index), where the kernel
  // orders them so.
  const std::size_t batch = lens.size() / std::size_t(lens_per_head);
  std::vector<std::size_t> order(batch);
  for (std::size_t b = 0; b < batch; ++b) order[b] = b;
  if (longest_first(s, lens_per_head == 1, unsplit, device, op)) {
    std::stable_sort(order.begin(), order.end(),
                     [&](std::size_t x, std::size_t y) { return lens[x] > lens[y]; });
  }
  int best = 1;
  double best_cost = greedy_finish(lens, order, lens_per_head, units1, 1, align, slots1);
  // A slot streams its multiprocessor's share: where the split kernel runs more CTAs a
  // multiprocessor than the unsplit one, each of its slots is that much slower, and its finish
  // (tokens a slot streams) is scaled by the ratio. Counted equal, the split launches' extra
  // slots looked like bandwidth (on an H200, 64 sequences of 1-8k tokens planned 3 splits where
  // unsplit ran 4-15% faster: float16 and float8 caches at head_dim 128, 3 CTAs a multiprocessor
  // against 2; float8 at head_dim 64, 5 against 2).
  const double slot_time = double(slots_n) / double(slots1);
  const std::int64_t max_splits = max_split_count(longest);
  auto consider = [&](std::int64_t n) {  // in increasing n: ties keep the fewer splits
    if (n < 2 || n > max_splits || entries * units_n * n > kMaxSimulatedCtas) return;
    const double cost =
        greedy_finish(lens, order, lens_per_head, units_n, n, align, slots_n) * slot_time;
    if (cost < best_cost) best = int(n), best_cost = cost;
  };
  for (const std::int64_t n : kSimulatedSplits) consider(n);
  if (equal_plan > std::end(kSimulatedSplits)[-1]) consider(equal_plan);
  return best;
}

bool swap_split_launch(DType kv_dtype, int head_dim, std::int64_t max_seq_len, int num_splits) {
  if (kv_dtype != DType::Float8E4M3FN || num_splits < 2) return false;
  return head_dim == 256 || (max_seq_len + num_splits - 1) / num_splits <= kSwapSplitMaxChunk;
}

}  // namespace tinyserve::kernels::cuda
