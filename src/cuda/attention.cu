// CUDA paged attention: the entry points. They pick the kernel instantiation for a call (through
// dispatch.cuh, the one place where run-time values become template arguments), plan the split
// count and launch. The pieces live in attention/:
//
//   page.cuh            paged addressing: block-table lookup, bounds check, K/V row addresses
//   state.cuh           online-softmax state and the merge of states
//   params.cuh          the decode kernels' arguments, built once per call
//   decode_common.cuh   a decode CTA's work unit and its warps' epilogue
//   decode_mma.cuh      the tensor-core decode kernel (float16/bfloat16 queries, caches of the
//                       query's type or float8 e4m3fn, head_dim 64/128/256)
//   decode_generic.cuh  the CUDA-core decode kernel (any dtype, float8 caches, head_dim <= 512)
//   split_merge.cuh     outputs and split partials, and the kernel that merges the partials
//   split_plan.cuh/.cu  the split planner and the occupancy cache
//   prefill_common.cuh  the prefill kernels' arguments and their in-kernel tile schedule
//   prefill_mma.cuh     the tensor-core prefill kernel (float16/bfloat16, head_dim 64/128/256)
//   prefill_wgmma.cuh   the Hopper prefill kernel (warpgroup MMA, sm_90a builds; same types)
//   prefill_generic.cuh the CUDA-core prefill kernel (any dtype, float8 caches, head_dim <= 512)
//
// With query_start_loc (prefill, append, chunked prefill, decode rows mixed in), a prefill
// kernel runs the sequences' rows. Where the tensor-core prefill kernels run a batch of fewer
// than kMixedRowsPerSequence query rows per sequence on average (decode rows mixed in), the
// tensor-core decode kernel runs first over every sequence and attends those with exactly one
// row, whose tiles in the prefill kernel then exit at once: a decode row would otherwise fill one
// position of a prefill CTA's tile. Otherwise the prefill kernel runs every row. The split merge
// follows when the keys are split (both kernels write partials of the same layout, one merge
// combines them): at most three launches. The grids come from host values (the number of query
// rows and sequences), the work per CTA from query_start_loc read on the device, through the
// same clamping in both kernels (params.cuh), so each row is written by exactly one of them
// whatever a captured CUDA graph's offsets hold at replay.
//
// Long sequences are split into num_splits chunks (flash-decoding): each CTA writes a float32
// partial and its log-sum-exp to the caller's workspace, and merge_splits_kernel combines them;
// in a decode launch of the tensor-core kernel with at most kMaxClusterSplits splits on sm_90,
// the splits of a row run as one thread-block cluster and merge through distributed shared
// memory instead (cluster_merge_and_store: no partials, no second launch).
// The split count and the grid come from host values only, so a captured CUDA graph stays
// correct when lengths and tables change between replays.

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "core/kernels.h"
#include "cuda/attention/decode_generic.cuh"
#include "cuda/attention/decode_mma.cuh"
#include "cuda/attention/params.cuh"
#include "cuda/attention/prefill_generic.cuh"
#include "cuda/attention/prefill_mma.cuh"
#include "cuda/attention/prefill_wgmma.cuh"
#include "cuda/attention/split_merge.cuh"
#include "cuda/attention/split_plan.cuh"
#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"

namespace tinyserve::kernels::cuda {
namespace {

template <class T, class KV, int D, bool SplitConfig, bool Cluster, bool Swap = false>
DecodeLaunch mma_launch() {
  using C = MmaConfig<D, int(sizeof(KV)), SplitConfig>;
  return {reinterpret_cast<const void*>(decode_mma_kernel<T, KV, D, SplitConfig, Cluster, Swap>),
          C::kSmemBytes,
          C::kSmemBytes,
          kMmaHeads,
          C::kThreads,
          Cluster};
}

template <class T, class KV>
DecodeLaunch generic_launch(int head_dim) {
  return {reinterpret_cast<const void*>(decode_generic_kernel<T, KV>), generic_smem_bytes(head_dim),
          generic_smem_bytes(kGenericMaxDim), kGenericHeads, kDecodeThreads};
}

// The decode kernel for a call: the tensor-core kernel where the query dtype and head_dim have
// one and every row start is 16-byte aligned (`aligned`), else the CUDA-core kernel. With
// `cluster` (split launches only), the tensor-core kernel's variant that merges its splits in a
// cluster (DecodeLaunch::cluster_merge tells whether that is the one returned). `group`: query
// heads per KV head; over float8 caches an unsplit launch of a group of at most 8 takes the
// kernel whose MMAs have the tokens as M and the heads as N (decode_mma_kernel's Swap: on an
// H200, 1.3-10.6% faster on the unsplit float8 cases of the decode grid, 2.7% at 64 x 4096), and
// so does a split launch with `swap_split` (swap_split_launch, split_plan.cuh). The planner plans
// with the unswapped split kernel (swap_split false): the swapped one's fewer registers let 5 CTAs
// share a multiprocessor instead of 3 at head_dim 128, and the planner's model, fitted to the
// other, would pick more splits for it than are fastest.
DecodeLaunch decode_launch(DType dtype, DType kv_dtype, int head_dim, int group, bool split,
                           bool aligned, const char* op, bool cluster = false,
                           bool swap_split = false) {
  return dispatch_float_dtype(dtype, op, [&](auto type) {
    using T = typename decltype(type)::type;
    return dispatch_kv_dtype<T>(kv_dtype, [&](auto kv_type) {
      using KV = typename decltype(kv_type)::type;
      if constexpr (kHasTensorCoreType<T>) {
        if (aligned) {
          return dispatch_mma_head_dim(
              head_dim,
              [&](auto dim) {
                constexpr int D = decltype(dim)::value;
                return dispatch_bool(split, [&](auto is_split) {
                  constexpr bool kSplit = decltype(is_split)::value;
                  constexpr bool kConfig = mma_split_config(D, int(sizeof(KV)), kSplit);
                  auto with_swap = [&](auto swap) {
                    constexpr bool kSwap = decltype(swap)::value;
                    if constexpr (kSplit) {
                      if (cluster) return mma_launch<T, KV, D, kConfig, true, kSwap>();
                    }
                    return mma_launch<T, KV, D, kConfig, false, kSwap>();
                  };
                  if constexpr (sizeof(KV) == 1) {
                    if (group <= 8 && (!kSplit || swap_split)) return with_swap(std::true_type{});
                  }
                  return with_swap(std::false_type{});
                });
              },
              [&] { return generic_launch<T, KV>(head_dim); });
        }
      }
      return generic_launch<T, KV>(head_dim);
    });
  });
}

// A prefill kernel as the planner and the launch see it: heads_per_cta query heads of a group
// and `positions` query positions per CTA; tensor_core: mma.sync or wgmma.
struct PrefillLaunch {
  DecodeLaunch launch;
  int positions;
  bool tensor_core;
};

template <class T, int D>
DecodeLaunch prefill_mma_launch() {
  using C = PrefillMmaShape<T, D>;
  return {reinterpret_cast<const void*>(prefill_mma_kernel<T, C>), C::kSmemBytes, C::kSmemBytes,
          C::kRows, C::kThreads};
}

template <class T, int D>
DecodeLaunch prefill_wgmma_launch() {
  using C = PrefillWgmmaShape<D>;
  return {reinterpret_cast<const void*>(prefill_wgmma_kernel<T, D>), C::kSmemBytes, C::kSmemBytes,
          C::kRows, C::kThreads};
}

template <class T, class KV = T>
DecodeLaunch prefill_generic_launch(int head_dim) {
  return {reinterpret_cast<const void*>(prefill_generic_kernel<T, KV>),
          generic_prefill_smem_bytes(head_dim), generic_prefill_smem_bytes(kGenericMaxDim),
          kGenericPrefillRows, kGenericPrefillThreads};
}

// A batch of fewer query rows per sequence than this on average is "mixed" where the
// tensor-core prefill kernels run it: the decode kernel takes its one-row sequences (see the top
// of this file).
constexpr std::int64_t kMixedRowsPerSequence = 64;

bool mixed_batch(std::int64_t num_query_rows, int batch) {
  return num_query_rows < kMixedRowsPerSequence * std::int64_t(batch);
}

// In a mixed batch, the multi-row work (query rows past one per sequence) from which the Hopper
// kernel runs the prefill launch: below it, a few rows would leave its 128-row CTAs mostly empty.
constexpr std::int64_t kWgmmaMixedRows = 256;

// Whether a prefill launch takes the Hopper kernel: built for sm_90a, run on a compute
// capability 9.0 device, and either sequences of at least kMixedRowsPerSequence query rows on
// average, or a mixed batch with at least kWgmmaMixedRows rows past its decode rows. Its CTAs
// hold 128 rows in two warpgroups of 64, so a batch of mostly decode rows (one position x the
// group per sequence) run in this kernel would run 64-row MMAs for a few rows: the mma.sync
// kernel, whose warps take 16 rows, wastes less there. In a mixed batch the decode kernel takes
// the decode rows, so only the rest count.
#if defined(TINYSERVE_WGMMA)
constexpr bool kWgmmaBuilt = true;
#else
constexpr bool kWgmmaBuilt = false;
#endif

bool use_wgmma_prefill(int device_index, std::int64_t num_query_rows, int batch) {
  return kWgmmaBuilt &&
         (!mixed_batch(num_query_rows, batch) || num_query_rows - batch >= kWgmmaMixedRows) &&
         device_info(device_index).compute_capability == 90;
}

// The prefill kernel for a call: over float8 caches the CUDA-core kernel, which dequantises in
// registers (the tensor-core kernels read caches of the query's type only); otherwise, where the
// dtype and head_dim have one and every row start is 16-byte aligned, the Hopper kernel when
// `wgmma` (use_wgmma_prefill) else the mma.sync kernel; else the CUDA-core kernel. A CTA's rows
// are positions x query heads: min(group, rows) heads, and as many positions as fit.
PrefillLaunch prefill_launch(DType dtype, DType kv_dtype, int head_dim, bool aligned, int group,
                             bool wgmma, const char* op) {
  PrefillLaunch pl = dispatch_float_dtype(dtype, op, [&](auto type) {
    using T = typename decltype(type)::type;
    auto generic = [&] { return PrefillLaunch{prefill_generic_launch<T>(head_dim), 0, false}; };
    if (kv_dtype == DType::Float8E4M3FN) {
      return PrefillLaunch{prefill_generic_launch<T, __nv_fp8_e4m3>(head_dim), 0, false};
    }
    if constexpr (kHasTensorCoreType<T>) {
      if (aligned) {
        return dispatch_mma_head_dim(
            head_dim,
            [&](auto dim) {
              constexpr int D = decltype(dim)::value;
              return PrefillLaunch{
                  wgmma ? prefill_wgmma_launch<T, D>() : prefill_mma_launch<T, D>(), 0, true};
            },
            generic);
      }
    }
    return generic();
  });
  const int rows = pl.launch.heads_per_cta;
  pl.launch.heads_per_cta = std::min(group, rows);
  pl.positions = rows / pl.launch.heads_per_cta;
  return pl;
}

// CTAs along the prefill grid's x: num_query_rows / positions + batch virtual tiles (see
// prefill_common.cuh).
std::int64_t prefill_tiles(std::int64_t num_query_rows, int batch, int positions) {
  return num_query_rows / positions + batch;
}

const void* merge_kernel(DType dtype, const char* op) {
  return dispatch_float_dtype(dtype, op, [](auto type) {
    using T = typename decltype(type)::type;
    return reinterpret_cast<const void*>(merge_splits_kernel<T>);
  });
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// The tensor-core kernel moves 16-byte rows: every row start must be 16-byte aligned.
bool rows_aligned16(const PagedAttentionParams& p) {
  const std::int64_t q = 16 / std::int64_t(dtype_size(p.query_dtype));
  const std::int64_t kv = 16 / std::int64_t(dtype_size(p.kv_dtype));
  return aligned16(p.query) && aligned16(p.key_cache.data) && aligned16(p.value_cache.data) &&
         p.q_stride_batch % q == 0 && p.q_stride_head % q == 0 &&
         p.key_cache.stride_block % kv == 0 && p.key_cache.stride_token % kv == 0 &&
         p.key_cache.stride_head % kv == 0 && p.value_cache.stride_block % kv == 0 &&
         p.value_cache.stride_token % kv == 0 && p.value_cache.stride_head % kv == 0;
}

// The decode kernel of call p (decode_launch over its dtypes, head_dim, group and alignment),
// unsplit or as its split launch runs it: with the swapped MMAs where swap_split_launch says so,
// and with `cluster`, the cluster-merge variant.
DecodeLaunch call_decode_launch(const PagedAttentionParams& p, bool split, bool cluster,
                                const char* op) {
  return decode_launch(
      p.query_dtype, p.kv_dtype, p.head_dim, p.num_q_heads / p.num_kv_heads, split,
      rows_aligned16(p), op, cluster,
      split && swap_split_launch(p.kv_dtype, p.head_dim, p.max_seq_len, p.num_splits));
}

// The tensor-core prefill kernel also stores pairs of output elements as one 32-bit word.
bool prefill_aligned(const PagedAttentionParams& p) {
  return rows_aligned16(p) && aligned16(p.out) && p.out_stride_batch % 8 == 0 &&
         p.out_stride_head % 8 == 0;
}

void launch_merge(const PagedAttentionParams& p, AttentionOutput& output, cudaStream_t s,
                  const char* op) {
  launch_after(merge_kernel(p.out_dtype, op), dim3(unsigned(output.batch * p.num_q_heads)),
               dim3(kMergeThreads), merge_smem_bytes(p.head_dim), s, output,
               device_info(p.device_index).overlaps_launches(), op, "merge_splits_kernel");
}

void prefill_attention(const PagedAttentionParams& p, cudaStream_t s, const char* op) {
  const int group = p.num_q_heads / p.num_kv_heads;
  const PrefillLaunch pl =
      prefill_launch(p.query_dtype, p.kv_dtype, p.head_dim, prefill_aligned(p), group,
                     use_wgmma_prefill(p.device_index, p.num_query_rows, p.batch), op);
  const bool mixed = pl.tensor_core && mixed_batch(p.num_query_rows, p.batch);
  const std::int64_t tiles = prefill_tiles(p.num_query_rows, p.batch, pl.positions);
  if (tiles > INT32_MAX) {
    detail::fail(op, "too many query rows for the CUDA prefill grid, got ", p.num_query_rows);
  }
  // Everything that may fail comes before the first launch, so a rejected call writes nothing.
  prepare_launch(pl.launch, p.device_index, op);
  DecodeLaunch dl{};
  if (mixed) {
    // The tensor-core decode kernel: the prefill kernel's types and alignment imply it.
    dl = call_decode_launch(p, p.num_splits > 1, false, op);
    prepare_launch(dl, p.device_index, op);
  }
  PrefillArgs a{};
  a.a = make_decode_args(p, pl.launch.heads_per_cta);
  a.query_start_loc = p.query_start_loc;
  a.batch = p.batch;
  a.num_query_rows = int(p.num_query_rows);
  a.positions = pl.positions;
  a.heads_per_cta = pl.launch.heads_per_cta;
  a.skip_single_rows = mixed;
  if (mixed) {
    DecodeArgs d = make_decode_args(p, dl.heads_per_cta);
    d.query_start_loc = p.query_start_loc;
    d.num_query_rows = int(p.num_query_rows);
    const dim3 grid(unsigned(p.num_kv_heads * d.head_tiles), unsigned(p.num_splits),
                    unsigned(p.batch));
    launch(dl.kernel, grid, dim3(dl.threads), std::size_t(dl.smem_bytes), s, d, op,
           "decode kernel");
  }
  const dim3 grid(unsigned(tiles), unsigned(p.num_kv_heads * a.a.head_tiles),
                  unsigned(p.num_splits));
  launch(pl.launch.kernel, grid, dim3(pl.launch.threads), std::size_t(pl.launch.smem_bytes), s, a,
         op, "prefill kernel");
  if (p.num_splits > 1) launch_merge(p, a.a.output, s, op);
}

}  // namespace

int plan_prefill_splits(int device_index, DType dtype, DType kv_dtype, int batch,
                        std::int64_t num_query_rows, int num_q_heads, int num_kv_heads,
                        int head_dim, std::int64_t max_kv_len) {
  const char* op = "plan_paged_attention";
  DeviceGuard guard(device_index, op);
  const PrefillLaunch pl =
      prefill_launch(dtype, kv_dtype, head_dim, true, num_q_heads / num_kv_heads,
                     use_wgmma_prefill(device_index, num_query_rows, batch), op);
  // The planner counts CTAs as "sequences" x KV heads x head tiles; a prefill CTA reads at most
  // max_kv_len keys like a decode one. The prefill kernel is the one the call launches (planned
  // for aligned rows, as in decode). In a mixed batch the one split count serves both launches;
  // the virtual tiles count one per sequence, which stands for its decode CTAs.
  const std::int64_t tiles = prefill_tiles(num_query_rows, batch, pl.positions);
  // Prefill CTAs differ in work (positions, causal ranges, decode rows mixed in), so once they
  // fill every slot of the GPU the scheduler balances them better than splits would: a split
  // then only adds partial writes and a merge (measured on a mixed step of decode rows and
  // chunks: 0.97 ms with the wave-count model's 3 splits, 0.70 ms unsplit, H200).
  const int group = num_q_heads / num_kv_heads;
  const std::int64_t ctas =
      tiles * num_kv_heads * ((group + pl.launch.heads_per_cta - 1) / pl.launch.heads_per_cta);
  const std::int64_t slots = std::int64_t(device_info(device_index).multiprocessors) *
                             prepare_launch(pl.launch, device_index, op);
  if (ctas >= slots) return 1;
  const SplitPlanShape shape{int(std::min<std::int64_t>(tiles, INT32_MAX)), num_q_heads,
                             num_kv_heads, max_kv_len, kMinPrefillSplitTokens};
  return plan_splits(shape, pl.launch, pl.launch, device_index, op);
}

int plan_attention_splits(int device_index, DType dtype, DType kv_dtype, int batch, int num_q_heads,
                          int num_kv_heads, int head_dim, std::int64_t max_kv_len,
                          const std::vector<std::int64_t>& lens, int lens_per_head) {
  const char* op = "plan_paged_attention";
  DeviceGuard guard(device_index, op);
  // Planned for the kernels of aligned rows (what a framework allocates); an unaligned call
  // runs the CUDA-core kernel with the same split count.
  const SplitPlanShape shape{batch, num_q_heads, num_kv_heads, max_kv_len, kMinDecodeSplitTokens};
  const int group = num_q_heads / num_kv_heads;
  const DecodeLaunch unsplit = decode_launch(dtype, kv_dtype, head_dim, group, false, true, op);
  const DecodeLaunch split = decode_launch(dtype, kv_dtype, head_dim, group, true, true, op);
  const DecodeLaunch clustered =
      decode_launch(dtype, kv_dtype, head_dim, group, true, true, op, true);
  return plan_splits_for_lengths(shape, lens, lens_per_head, kMinDecodeSplitTokens, unsplit, split,
                                 device_index, op, clustered.cluster_merge ? &clustered : nullptr);
}

void paged_attention(const PagedAttentionParams& p, Stream stream) {
  const char* op = "paged_attention";
  DeviceGuard guard(p.device_index, op);
  if (p.query_start_loc) return prefill_attention(p, as_stream(stream), op);
  const bool split = p.num_splits > 1;
  // A split launch of the tensor-core kernel merges its splits in clusters where its clusters
  // fit the device (cluster_launch_fits); otherwise, and always in the CUDA-core kernel,
  // merge_splits_kernel follows it. Both variants take the same CTAs (the arguments below).
  DecodeLaunch l = call_decode_launch(p, split, split, op);
  DecodeArgs a = make_decode_args(p, l.heads_per_cta);
  if (l.cluster_merge &&
      !cluster_launch_fits(l, p.device_index, p.num_splits,
                           std::int64_t(p.batch) * p.num_kv_heads * a.head_tiles, op)) {
    l = call_decode_launch(p, split, false, op);
  }
  prepare_launch(l, p.device_index, op);
  // Ordered by length as the planner simulates it (plan_splits_for_lengths).
  const DecodeLaunch unsplit = split ? call_decode_launch(p, false, false, op) : l;
  const SplitPlanShape shape{p.batch, p.num_q_heads, p.num_kv_heads, p.max_seq_len,
                             kMinDecodeSplitTokens};
  a.longest_first = longest_first(shape, p.seq_lens_stride_head == 0, unsplit, p.device_index, op);
  cudaStream_t s = as_stream(stream);
  // The KV heads of one sequence run side by side: in NHD storage they read neighbouring slices
  // of the same token rows.
  const dim3 grid(unsigned(p.num_kv_heads * a.head_tiles), unsigned(p.num_splits),
                  unsigned(p.batch));
  // On sm_90 the decode kernel is launched to be scheduled while the previous kernel drains (it
  // waits for that kernel on the device before reading anything): its launch and start hide
  // behind that kernel's tail.
  const bool overlap = device_info(p.device_index).overlaps_launches();
  if (l.cluster_merge) {  // only on sm_90+ (cluster_launch_fits)
    launch_with(l.kernel, grid, dim3(l.threads), std::size_t(l.smem_bytes), s, a,
                cluster_y_attribute(p.num_splits), overlap_attribute(), op, "decode kernel");
    return;
  }
  launch_after(l.kernel, grid, dim3(l.threads), std::size_t(l.smem_bytes), s, a, overlap, op,
               "decode kernel");
  if (split) launch_merge(p, a.output, s, op);
}

}  // namespace tinyserve::kernels::cuda
