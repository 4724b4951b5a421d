#pragma once

// The split planner (how many pieces flash-decoding cuts each sequence into) and the occupancy
// cache it reads: host code only. The planner sees a decode kernel through a DecodeLaunch, so it
// needs no kernel template; attention.cu picks the launches (dispatch) and passes them in.

#include <cstdint>
#include <vector>

#include "tinyserve/tensor.h"

namespace tinyserve::kernels::cuda {

// One decode kernel instantiation as a launch sees it.
struct DecodeLaunch {
  const void* kernel = nullptr;
  int smem_bytes = 0;      // dynamic shared memory of this launch
  int max_smem_bytes = 0;  // the most any launch of this kernel asks for
  int heads_per_cta = 0;   // query heads of a group per CTA
  int threads = 0;
  bool cluster_merge = false;  // a split launch run as clusters of its splits (no merge launch)
};

// The most splits a decode launch merges inside one thread-block cluster (the portable cluster
// size); a launch of more splits writes partials and runs merge_splits_kernel.
constexpr int kMaxClusterSplits = 8;

// Whether a launch of `clusters` clusters of `splits` CTAs of l (a decode kernel with the cluster
// merge, DecodeLaunch::cluster_merge) merges in them on `device`: 2 to kMaxClusterSplits splits,
// compute capability 9.0 or later, the kernel's code built for it (PTX version 9.0 or later),
// and either every cluster resident at once (cudaOccupancyMaxActiveClusters, cached per kernel,
// device, size and shared memory) or clusters of this size filling every CTA slot of the device
// (two splits do). A cluster waits for a whole group of free slots in one GPC, so where fewer
// clusters than that fill the device, the last ones of a longer launch run in a late partial
// wave (on an H200, 8 x 32k tokens at head_dim 64 in 64 clusters of 4, against room for 62:
// 60% slower than the merge kernel's launch); such launches merge through merge_splits_kernel.
bool cluster_launch_fits(const DecodeLaunch& l, int device, int splits, std::int64_t clusters,
                         const char* op);

// Raises the kernel's dynamic shared-memory limit to l.max_smem_bytes, once per (kernel, device),
// and returns how many CTAs of the launch fit on one multiprocessor (cached).
int prepare_launch(const DecodeLaunch& l, int device, const char* op);

// The shortest chunk a split may make, in tokens. Decode: one tile of the tensor-core kernel at
// head_dim 128, so that a short key range can still be spread over the GPU (a table selected by
// select_pages holds 2,048 tokens per KV head: 32 chunks put the 8 KV heads of one sequence on
// every multiprocessor); the cost model keeps longer chunks wherever there is enough work.
// Prefill: 256.
constexpr int kMinDecodeSplitTokens = 64;
constexpr int kMinPrefillSplitTokens = 256;

// The shapes a plan depends on: host values only, so that a captured CUDA graph replays with
// new lengths and tables.
struct SplitPlanShape {
  int batch, num_q_heads, num_kv_heads;
  std::int64_t max_kv_len;  // the longest key range one query may read
  int min_split_tokens;     // no split makes chunks shorter than this
};

// The most sequences a decode launch orders by length (DecodeArgs::longest_first): each CTA
// ranks them all, batch^2 / 128 comparisons per thread.
constexpr int kLongestFirstMaxBatch = 256;

// Whether a decode launch of s.batch sequences orders its sequences by length, longest first
// (DecodeArgs::longest_first; the tensor-core kernel does, the CUDA-core kernel keeps index
// order): where each sequence has one length for all KV heads, there are 2 to
// kLongestFirstMaxBatch of them, and the CTAs of the `unsplit` kernel would fill the GPU fewer
// than three times. Longer launches balance themselves, and the ranking each CTA does before its
// first load costs them more than it saves (on an H200, 256 x 1024 tokens: 8% slower).
bool longest_first(const SplitPlanShape& s, bool one_length_per_sequence,
                   const DecodeLaunch& unsplit, int device, const char* op);

// The split count for a call of equal key ranges (s.max_kv_len each). Within one wave of the
// unsplit kernel's CTAs: 1 where that kernel's own cheapest count is 1, else the cheapest count
// for the kernel that split launches use, each count costed as its waves (rounded up) times a
// CTA's chunk plus a fixed cost. Past one wave: the cheapest of 1 to kMaxSharedWaveSplits, a
// partial last wave costed by its share of a full one (at least kPartialWaveFloor of it) and a
// split launch's waves scaled by its slots over the unsplit kernel's.
// With `clustered` (the split kernel's cluster-merge variant, where the call may run it), a count
// of at most kMaxClusterSplits whose clusters all fit at once (cluster_launch_fits) is costed
// without the merge: kClusterMergeSavingTokens less.
int plan_splits(const SplitPlanShape& s, const DecodeLaunch& unsplit, const DecodeLaunch& split,
                int device, const char* op, const DecodeLaunch* clustered = nullptr);

// The split count for a decode call whose key ranges the caller knows on the host: lens holds
// one per sequence (lens_per_head 1) or one per (sequence, KV head) (lens_per_head =
// num_kv_heads), each at most s.max_kv_len. Where the ranges differ, the CTAs of each candidate
// count are scheduled greedily in launch order (longest first where longest_first holds) onto the
// GPU's slots (each CTA its chunk plus a fixed cost that covers its partial and merge), and the
// shortest finish wins, a split count's finish scaled by the CTAs a multiprocessor of the split
// kernel over the unsplit one's (a slot streams its share of the multiprocessor); equal ranges
// plan as plan_splits.
int plan_splits_for_lengths(const SplitPlanShape& s, const std::vector<std::int64_t>& lens,
                            int lens_per_head, int align, const DecodeLaunch& unsplit,
                            const DecodeLaunch& split, int device, const char* op,
                            const DecodeLaunch* clustered = nullptr);

// Whether a split launch over float8 caches runs the decode kernel with swapped MMAs (tokens as
// M, query heads as N) instead of the one the planner plans for: at head_dim 256 always; at
// head_dim 64 and 128 where a split's chunk of keys (max_seq_len over num_splits) is at most
// kSwapSplitMaxChunk tokens. Two runs on an H200 (71 split cases, each kernel at the same
// planned split count) found the swapped kernel faster, or within 1%, on every case at head_dim
// 256 (1-9%) and on every case with chunks of at most 1,024 tokens (up to 22%: short sequences
// of few splits, one sequence of 4-32k tokens in 49), but at head_dim 64 and 128 with longer
// chunks 18% faster to 13% slower (16 x 16384 at head_dim 64 in 5 splits 13% slower, 8 x 32768
// at head_dim 128 in 6 splits 3.6%, ragged batches of 28-48 sequences 3-6.5%): its fewer
// registers let more CTAs share a multiprocessor (5 against 3 at head_dim 128), and long chunks
// then share the bandwidth less evenly. Split counts are planned for the unswapped kernel, whose
// occupancy the planner's model was fitted to.
constexpr std::int64_t kSwapSplitMaxChunk = 1024;
bool swap_split_launch(DType kv_dtype, int head_dim, std::int64_t max_seq_len, int num_splits);

}  // namespace tinyserve::kernels::cuda
