// CUDA page summaries and page selection.
//
// Summaries written with the cache: one thread block per token of the call; the block of the
// first token (in slot_mapping order) that writes a page owns that page for the call, gathers
// every token of the call on the page, and rewrites the page's summary alone. No two blocks
// write one page, so no atomics are needed and the result does not depend on scheduling. Into a
// float8 cache each key is summarised as the cache holds it (x / k_scale rounded to e4m3, times
// k_scale); a filled float8 cache is summarised from its stored values times k_scale.
//
// Selection: a scoring kernel spread over (sequence, page range) writes one float score per
// (sequence, KV head, page) into the caller's scratch; its warps each stream whole pages (every KV
// head's summary rows at once) through shared memory, several pages in flight. A selection
// kernel, one thread block per (sequence, KV head),
// reads that row of scores into shared memory once, finds the k-th largest by a radix select
// whose bins span the keys' own range (usually one or two passes), keeps the pages above it and
// the lowest-indexed pages equal to it, and writes them in logical order after one block scan;
// it is launched to overlap the scoring kernel's end (programmatic dependent launch, sm_90) and
// waits for it on the device, as the scoring kernel does for the kernel before it.
// Grids depend only on host-known shapes: graph capturable, no host sync.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/kernels.h"
#include "cuda/attention/split_plan.cuh"
#include "cuda/common.cuh"
#include "cuda/dispatch.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/page_meta.cuh"
#include "cuda/ptx.cuh"

namespace tinyserve::kernels::cuda {
namespace {

// Elements (head, dim) of one page that a thread folds per tile.
constexpr int kPerThread = 4;

// One thread's share of a page summary while it is built, over a tile of elements: MinMax keeps
// (min, max); MeanStd keeps the running mean and the sum of squared deviations from it (Welford),
// since E[x^2] - E[x]^2 in float32 loses a small standard deviation to cancellation.
struct Accumulator {
  float a[kPerThread], b[kPerThread];
  int count;
};

__device__ __forceinline__ void acc_reset(Accumulator& acc, PageSummary kind) {
  for (int i = 0; i < kPerThread; ++i) {
    acc.a[i] = kind == PageSummary::MinMax ? INFINITY : 0.0f;
    acc.b[i] = kind == PageSummary::MinMax ? -INFINITY : 0.0f;
  }
  acc.count = 0;
}

// `n`: the number of keys folded so far, this one included (MeanStd's running mean needs it).
template <class T>
__device__ __forceinline__ void acc_fold(Accumulator& acc, int i, PageSummary kind, T key, int n) {
  const float x = to_float(key);
  if (kind == PageSummary::MinMax) {
    acc.a[i] = fminf(acc.a[i], x);
    acc.b[i] = fmaxf(acc.b[i], x);
  } else {
    const float delta = x - acc.a[i];
    acc.a[i] += delta / float(n);
    acc.b[i] = fmaf(delta, x - acc.a[i], acc.b[i]);
  }
}

template <class T>
__device__ __forceinline__ void acc_load(Accumulator& acc, int i, PageSummary kind, T r0, T r1,
                                         int n) {
  const float x = to_float(r0), y = to_float(r1);
  if (kind == PageSummary::MinMax) {
    acc.a[i] = x;
    acc.b[i] = y;
  } else {
    acc.a[i] = x;
    acc.b[i] = float(n) * y * y;
  }
}

// Float8 e4m3fn bits one step toward minus infinity (from +-0: the negative smallest subnormal),
// saturating at -448.
__device__ __forceinline__ std::uint32_t fp8_step_down(std::uint32_t bits) {
  const std::uint32_t magnitude = bits & 0x7fu;
  if (magnitude == 0) return 0x81u;
  if (bits & 0x80u) return magnitude < 0x7eu ? bits + 1 : bits;
  return bits - 1;
}

// x as stored in a summary of type M: 16-bit and float32 summaries to nearest; float8 e4m3fn ones
// toward minus infinity (direction < 0: a minimum), plus infinity (> 0: a maximum, a standard
// deviation) or to nearest (0: a mean), saturating at +-448, so that a float8 min/max box still
// holds every key within that range.
template <class M>
__device__ __forceinline__ M stored(float x, int direction) {
  if constexpr (std::is_same_v<M, __nv_fp8_e4m3>) {
    std::uint32_t bits = to_fp8_e4m3(x);
    __nv_fp8_e4m3 r;
    r.__x = __nv_fp8_storage_t(bits);
    if (direction != 0 && !isnan(x)) {
      const float v = to_float(r);
      if (direction < 0 && v > x) bits = fp8_step_down(bits);
      if (direction > 0 && v < x) bits = fp8_step_down(bits ^ 0x80u) ^ 0x80u;
      r.__x = __nv_fp8_storage_t(bits);
    }
    return r;
  } else {
    return from_float<M>(x);
  }
}

template <class M>
__device__ __forceinline__ void acc_store(const Accumulator& acc, int i, PageSummary kind, M* r0,
                                          M* r1) {
  if (kind == PageSummary::MinMax) {
    *r0 = stored<M>(acc.a[i], -1);
    *r1 = stored<M>(acc.b[i], 1);
  } else {
    const float n = float(max(acc.count, 1));
    *r0 = stored<M>(acc.a[i], 0);
    *r1 = stored<M>(sqrtf(fmaxf(0.0f, acc.b[i] / n)), 1);
  }
}

// Exclusive scan over the thread block (blockDim.x a multiple of 32, at most 1024); returns the
// prefix of `value` and writes the block's total to *total. `scratch` holds 33 ints.
__device__ int block_exclusive_scan(int value, int* total, int* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int warps = blockDim.x >> 5;
  int inclusive = value;
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += y;
  }
  if (lane == 31) scratch[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < warps ? scratch[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, w, o);
      if (lane >= o) w += y;
    }
    if (lane < warps) scratch[lane] = w;  // inclusive per warp
    if (lane == 31) scratch[32] = w;
  }
  __syncthreads();
  const int before = (warp > 0 ? scratch[warp - 1] : 0) + inclusive - value;
  *total = scratch[32];
  __syncthreads();  // scratch is reused by the next call
  return before;
}

// ---------------------------------------------------------------------------------------------
// Summaries written with the cache.

struct UpdateArgs {
  const char* key;                                 // [num_tokens, num_heads, head_dim]
  std::int64_t key_stride_token, key_stride_head;  // elements
  void* meta;
  std::int64_t meta_stride_block, meta_stride_head, meta_stride_row;
  const std::int64_t* slot_mapping;
  std::int64_t num_tokens;
  std::int64_t num_slots;
  int block_size;
  int num_heads;
  int head_dim;
  PageSummary kind;
  // A float8 cache's write: each key is summarised as stored, x / k_scale rounded to e4m3 (as the
  // cache write rounds it) times k_scale.
  bool quantised;
  ScaleArg k_scale;
};

// x as a float8 cache holds it: x / scale rounded to e4m3fn, times the scale.
__device__ __forceinline__ float as_stored_fp8(float x, float scale) {
  __nv_fp8_e4m3 q;
  q.__x = __nv_fp8_storage_t(quantise_e4m3(x, scale));
  return to_float(q) * scale;
}

// T: the keys' type; M: the summaries' (T, or float8 e4m3fn).
template <class T, class M>
__global__ void update_page_meta_kernel(const __grid_constant__ UpdateArgs a) {
  __shared__ int scratch[33];
  __shared__ int members[1024];
  __shared__ int lowest;
  const T* key = reinterpret_cast<const T*>(a.key);
  M* meta = reinterpret_cast<M*>(a.meta);
  for (std::int64_t tok = blockIdx.x; tok < a.num_tokens; tok += gridDim.x) {
    const std::int64_t slot = a.slot_mapping[tok];
    if (slot < 0 || slot >= a.num_slots) continue;
    const std::int64_t page = slot / a.block_size;
    // The common case first: the previous token wrote the same page, so it owns it.
    if (tok > 0) {
      const std::int64_t prev = a.slot_mapping[tok - 1];
      if (prev >= 0 && prev < a.num_slots && prev / a.block_size == page) continue;
    }
    // Owner: no earlier token of the call writes this page.
    bool owner = true;
    for (std::int64_t base = 0; base < tok && owner; base += blockDim.x) {
      const std::int64_t j = base + threadIdx.x;
      bool earlier = false;
      if (j < tok) {
        const std::int64_t s = a.slot_mapping[j];
        earlier = s >= 0 && s < a.num_slots && s / a.block_size == page;
      }
      owner = __syncthreads_or(earlier) == 0;
    }
    if (!owner) continue;
    // The page's earlier keys: the lowest offset this call writes (0 restarts the summary).
    if (threadIdx.x == 0) lowest = a.block_size;
    __syncthreads();
    for (std::int64_t base = tok; base < a.num_tokens; base += blockDim.x) {
      const std::int64_t j = base + threadIdx.x;
      if (j < a.num_tokens) {
        const std::int64_t s = a.slot_mapping[j];
        if (s >= 0 && s < a.num_slots && s / a.block_size == page) {
          atomicMin(&lowest, int(s - page * a.block_size));
        }
      }
    }
    __syncthreads();
    const int earlier_keys = lowest;
    const int elements = a.num_heads * a.head_dim;
    const int tile = kPerThread * blockDim.x;
    for (int first = 0; first < elements; first += tile) {
      Accumulator acc;
      acc_reset(acc, a.kind);
      if (earlier_keys > 0) {
        acc.count = earlier_keys;
        for (int i = 0; i < kPerThread; ++i) {
          const int e = first + i * blockDim.x + threadIdx.x;
          if (e >= elements) break;
          const int h = e / a.head_dim, d = e - h * a.head_dim;
          const M* r = meta + page * a.meta_stride_block + h * a.meta_stride_head + d;
          acc_load(acc, i, a.kind, r[0], r[a.meta_stride_row], earlier_keys);
        }
      }
      // The call's tokens on this page, in slot_mapping order, a chunk at a time.
      for (std::int64_t base = tok; base < a.num_tokens; base += blockDim.x) {
        const std::int64_t j = base + threadIdx.x;
        int mine = 0;
        if (j < a.num_tokens) {
          const std::int64_t s = a.slot_mapping[j];
          mine = s >= 0 && s < a.num_slots && s / a.block_size == page;
        }
        int found;
        const int at = block_exclusive_scan(mine, &found, scratch);
        if (mine) members[at] = int(j - tok);
        __syncthreads();
        for (int m = 0; m < found; ++m) {
          const std::int64_t t = tok + members[m];
          for (int i = 0; i < kPerThread; ++i) {
            const int e = first + i * blockDim.x + threadIdx.x;
            if (e >= elements) break;
            const int h = e / a.head_dim, d = e - h * a.head_dim;
            float x = to_float(key[t * a.key_stride_token + h * a.key_stride_head + d]);
            if (a.quantised) x = as_stored_fp8(x, a.k_scale.of(h));
            acc_fold(acc, i, a.kind, x, acc.count + m + 1);
          }
        }
        acc.count += found;
        __syncthreads();
      }
      for (int i = 0; i < kPerThread; ++i) {
        const int e = first + i * blockDim.x + threadIdx.x;
        if (e >= elements) break;
        const int h = e / a.head_dim, d = e - h * a.head_dim;
        M* r = meta + page * a.meta_stride_block + h * a.meta_stride_head + d;
        acc_store(acc, i, a.kind, r, r + a.meta_stride_row);
      }
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------
// Summaries of a filled cache: one thread block per (sequence, page).

struct BuildArgs {
  const char* key_cache;
  std::int64_t kc_stride_block, kc_stride_token, kc_stride_head;  // elements
  void* meta;
  std::int64_t meta_stride_block, meta_stride_head, meta_stride_row;
  const std::int32_t* block_table;
  std::int64_t block_table_stride;
  const std::int32_t* seq_lens;
  std::int64_t num_blocks;
  int block_size;
  int num_heads;
  int head_dim;
  PageSummary kind;
  ScaleArg k_scale;  // float8 caches: keys read as stored * k_scale
};

// T: the key cache's type (float8 e4m3fn: times K's scale); M: the summaries'.
template <class T, class M>
__global__ void build_page_meta_kernel(const __grid_constant__ BuildArgs a) {
  const int b = blockIdx.y;
  const std::int64_t len = a.seq_lens[b];
  const std::int64_t page = blockIdx.x;
  if (page * a.block_size >= len) return;
  const std::int64_t block = a.block_table[b * a.block_table_stride + page];
  if (block < 0 || block >= a.num_blocks) return;  // never out of bounds
  const int tokens = int(min(std::int64_t(a.block_size), len - page * a.block_size));
  const T* kc = reinterpret_cast<const T*>(a.key_cache) + block * a.kc_stride_block;
  M* meta = reinterpret_cast<M*>(a.meta) + block * a.meta_stride_block;
  const int elements = a.num_heads * a.head_dim;
  for (int first = 0; first < elements; first += kPerThread * blockDim.x) {
    Accumulator acc;
    acc_reset(acc, a.kind);
    for (int t = 0; t < tokens; ++t) {
      for (int i = 0; i < kPerThread; ++i) {
        const int e = first + i * blockDim.x + threadIdx.x;
        if (e >= elements) break;
        const int h = e / a.head_dim, d = e - h * a.head_dim;
        float x = to_float(kc[t * a.kc_stride_token + h * a.kc_stride_head + d]);
        if constexpr (std::is_same_v<T, __nv_fp8_e4m3>) x *= a.k_scale.of(h);
        acc_fold(acc, i, a.kind, x, t + 1);
      }
    }
    acc.count = tokens;
    for (int i = 0; i < kPerThread; ++i) {
      const int e = first + i * blockDim.x + threadIdx.x;
      if (e >= elements) break;
      const int h = e / a.head_dim, d = e - h * a.head_dim;
      M* r = meta + h * a.meta_stride_head + d;
      acc_store(acc, i, a.kind, r, r + a.meta_stride_row);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Selection.

struct SelectArgs {
  const char* query;
  std::int64_t q_stride_batch, q_stride_head;  // elements
  const char* meta;
  std::int64_t meta_stride_block, meta_stride_head, meta_stride_row;
  const std::int32_t* block_table;
  std::int64_t block_table_stride;
  const std::int32_t* seq_lens;
  std::int32_t* out_table;
  std::int64_t out_table_stride_batch, out_table_stride_head;
  std::int32_t* out_lens;
  std::int64_t out_lens_stride_batch, out_lens_stride_head;
  std::int32_t* hits;
  float* scores;  // [batch, num_kv_heads, max_blocks]
  std::int64_t num_blocks;
  int max_blocks;
  int num_q_heads, num_kv_heads, head_dim, block_size;
  int budget, num_sink_pages;
  int pages_per_block;  // scoring: pages per thread block
  int score_stages;     // page-wide / page-major scoring: rounds or pages staged per warp
  int lanes_per_head;   // page-wide scoring: lanes sharing one summary row (a power of two)
  bool query_chunked;   // page-wide / page-major scoring: query rows start 16-byte aligned
  PageSummary kind;
  GroupReduce reduce;
};

constexpr int kScoreThreads = 256;

// Sequence b's length as the device holds it, clamped to [0, the table's capacity]: lengths are
// never read on the host, and a wrong one must not send a kernel past the table's row.
__device__ __forceinline__ std::int64_t clamped_length(const SelectArgs& a, int b) {
  const std::int64_t capacity = std::int64_t(a.max_blocks) * a.block_size;
  return min(max(std::int64_t(a.seq_lens[b]), std::int64_t(0)), capacity);
}

// The candidate pages [begin, end) of sequence b that scoring thread block blockIdx.x scores,
// never a sink page or the last page; false where there are none, as where the sequence has no
// more pages than the budget (the selection kernel copies its table).
__device__ __forceinline__ bool scored_pages(const SelectArgs& a, int b, int& begin, int& end) {
  const std::int64_t len = clamped_length(a, b);
  const int pages = int((len + a.block_size - 1) / a.block_size);
  if (pages <= a.budget) return false;
  begin = max(int(blockIdx.x) * a.pages_per_block, a.num_sink_pages);
  end = min(int(blockIdx.x + 1) * a.pages_per_block, pages - 1);
  return begin < end;
}

// ---------------------------------------------------------------------------------------------
// Scoring, page-wide: the summaries of one page for all KV heads are loaded by one warp at once.
//
// A page's summary rows are 16-byte aligned and head_dim splits into whole 16-byte chunks. Lanes
// form groups of lanes_per_head (the chunks of a row, rounded up to a power of two, at most 32);
// each group takes one (page, KV head) item, each lane K chunks of both rows of it. A warp walks a
// run of consecutive pages of one sequence, its items (page-major) kScoreSlots / K per group a
// round at a time (4 KiB per warp). Rounds are copied into shared memory asynchronously, one or
// two ahead of the one being scored, so that a multiprocessor keeps 128 to 192 KiB of summaries
// in flight (sm_90) without holding them in registers; the block ids of the next 32 pages come
// from one coalesced load, and each group reduces its item's sum with log2(lanes_per_head)
// shuffles.
//
// With the group's scores summed (and more than one query head per KV head) the query heads are
// folded into two weight vectors per KV head before the pages are read:
//   meanstd: sum_g (q_g . mean + |q_g| . std) = (sum_g q_g) . mean + (sum_g |q_g|) . std
//   minmax:  sum_g max(q_g * min, q_g * max) = (sum_g min(q_g, 0)) . min + (sum_g max(q_g, 0)) .
//   max
//   minmax_damped: sum_g (3/4 max(q_g * min, q_g * max) + 1/4 min(q_g * min, q_g * max))
//            = (sum_g 3/4 min(q_g, 0) + 1/4 max(q_g, 0)) . min
//            + (sum_g 3/4 max(q_g, 0) + 1/4 min(q_g, 0)) . max
// (the last two hold elementwise since min <= max), so a page costs one dot product per KV head
// whatever the group size. The result is the reference's up to float32 rounding of a reordered
// sum. With the maximum, each query head is scored on its own from the query.

enum class ScoreMode { Folded, PerHeadMinMax, PerHeadMinMaxDamped, PerHeadMeanStd };

// The coefficients of a folded weight row: row 0 multiplies the summary's min (or mean) row, row
// 1 its max (or std) row, and a query element x adds alpha * min(x, 0) + beta * max(x, 0) to it
// (every kind is linear in x's negative and positive parts; mean: x, std: |x|). Callers take
// them once, outside their loops over elements (chosen per element they slowed the scoring).
__device__ __forceinline__ void fold_coefficients(PageSummary kind, int row, float& alpha,
                                                  float& beta) {
  if (kind == PageSummary::MinMax) {
    alpha = row == 0 ? 1.0f : 0.0f, beta = row == 0 ? 0.0f : 1.0f;
  } else if (kind == PageSummary::MinMaxDamped) {
    alpha = row == 0 ? 0.75f : 0.25f, beta = row == 0 ? 0.25f : 0.75f;
  } else {
    alpha = row == 0 ? 1.0f : -1.0f, beta = 1.0f;
  }
}

__device__ __forceinline__ float fold_term(float alpha, float beta, float x) {
  return fmaf(alpha, fminf(x, 0.0f), beta * fmaxf(x, 0.0f));
}

constexpr int kScoreSlots = 4;  // 16-byte chunks of each summary row a lane loads per round

template <class T>
constexpr int kChunkElems = 16 / int(sizeof(T));

template <class T>
__device__ __forceinline__ void chunk_to_float(const uint4& v, float (&out)[kChunkElems<T>]) {
  const std::uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(w[i]);
  } else if constexpr (std::is_same_v<T, __nv_fp8_e4m3>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint2 pairs = fp8x4_to_pairs<__half>(w[i]);
      const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&pairs.x));
      const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&pairs.y));
      out[4 * i] = lo.x, out[4 * i + 1] = lo.y, out[4 * i + 2] = hi.x, out[4 * i + 3] = hi.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const T* pair = reinterpret_cast<const T*>(&w[i]);
      out[2 * i] = to_float(pair[0]);
      out[2 * i + 1] = to_float(pair[1]);
    }
  }
}

// N consecutive query elements (N * sizeof(Q) whole 16-byte chunks, 16-byte aligned) as floats:
// a summary chunk's worth, which is one query chunk where the summaries have the query's type
// and two (16-bit) or four (float32) over float8 summaries.
template <class Q, int N>
__device__ __forceinline__ void query_to_float(const Q* q, float (&out)[N]) {
  constexpr int kQ = kChunkElems<Q>;
  static_assert(N % kQ == 0, "whole query chunks");
#pragma unroll
  for (int c = 0; c < N / kQ; ++c) {
    float part[kQ];
    chunk_to_float<Q>(*reinterpret_cast<const uint4*>(q + c * kQ), part);
#pragma unroll
    for (int e = 0; e < kQ; ++e) out[c * kQ + e] = part[e];
  }
}

// Weights and queries sit in shared memory by quarter-chunk: element d of a row (chunk c = d /
// N, of `chunks` per row) is float j % 4 of float4 (j / 4) * chunks + c, where j = d % N. The
// lanes of a group read their chunks' first float4s as consecutive 16-byte words, then their
// second ones (16-bit rows have two per chunk): no bank conflicts.
template <int N>
__device__ __forceinline__ int quarter_slot(int d, int chunks) {
  const int j = d % N, c = d / N;
  return ((j / 4) * chunks + c) * 4 + j % 4;
}

template <int N>
__device__ __forceinline__ float4 quarter(const float* row, int chunk, int chunks, int i) {
  return *reinterpret_cast<const float4*>(row + ((i / 4) * chunks + chunk) * 4);
}

// sum_i w0[i] * lo[i] + w1[i] * hi[i] over one chunk of two weight rows in shared memory.
template <int N>
__device__ __forceinline__ float weighted_chunk(const float* w0, const float* w1, int chunk,
                                                int chunks, const float (&lo)[N],
                                                const float (&hi)[N]) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 a = quarter<N>(w0, chunk, chunks, i);
    const float4 c = quarter<N>(w1, chunk, chunks, i);
    s = fmaf(a.x, lo[i], s);
    s = fmaf(a.y, lo[i + 1], s);
    s = fmaf(a.z, lo[i + 2], s);
    s = fmaf(a.w, lo[i + 3], s);
    s = fmaf(c.x, hi[i], s);
    s = fmaf(c.y, hi[i + 1], s);
    s = fmaf(c.z, hi[i + 2], s);
    s = fmaf(c.w, hi[i + 3], s);
  }
  return s;
}

// One query head's score terms over one chunk of its row in shared memory.
template <ScoreMode M, int N>
__device__ __forceinline__ float query_chunk(const float* q, int chunk, int chunks,
                                             const float (&lo)[N], const float (&hi)[N]) {
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < N; i += 4) {
    const float4 v = quarter<N>(q, chunk, chunks, i);
    const float x[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float a = x[j] * lo[i + j], b = x[j] * hi[i + j];
      if constexpr (M == ScoreMode::PerHeadMinMax) {
        s += fmaxf(a, b);
      } else if constexpr (M == ScoreMode::PerHeadMinMaxDamped) {
        s += fmaf(0.75f, fmaxf(a, b), 0.25f * fminf(a, b));
      } else {
        s += fmaf(x[j], lo[i + j], fabsf(x[j]) * hi[i + j]);
      }
    }
  }
  return s;
}

// The weights (Folded) or queries (per head) in shared memory from 16-byte chunks of the query
// rows, a thread per (KV head or query head, chunk), up to four query heads' loads in flight at
// once: one round trip to the query where element loads took one per element a thread builds.
// The same sums in the same order as element by element.
// Q: the query's type; MT: the summaries' (chunks of kChunkElems<MT> elements).
template <class Q, class MT, ScoreMode M>
__device__ __forceinline__ void build_weights_chunked(const SelectArgs& a, const Q* query,
                                                      int chunks, float* weights) {
  constexpr int kVec = kChunkElems<MT>;
  const int dim = a.head_dim;
  const auto store = [&](float* row, int chunk, const float(&x)[kVec]) {
#pragma unroll
    for (int q = 0; q < kVec / 4; ++q) {
      *reinterpret_cast<float4*>(row + (q * chunks + chunk) * 4) =
          make_float4(x[4 * q], x[4 * q + 1], x[4 * q + 2], x[4 * q + 3]);
    }
  };
  if constexpr (M == ScoreMode::Folded) {
    const int group = a.num_q_heads / a.num_kv_heads;
    float alpha0, beta0, alpha1, beta1;
    fold_coefficients(a.kind, 0, alpha0, beta0);
    fold_coefficients(a.kind, 1, alpha1, beta1);
    for (int i = threadIdx.x; i < a.num_kv_heads * chunks; i += blockDim.x) {
      const int h = i / chunks, c = i - h * chunks;
      const Q* q = query + std::int64_t(h) * group * a.q_stride_head + c * kVec;
      float w0[kVec], w1[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) w0[e] = w1[e] = 0.0f;
      for (int g0 = 0; g0 < group; g0 += 4) {
        float x[4][kVec];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (g0 + j < group) query_to_float<Q, kVec>(q + (g0 + j) * a.q_stride_head, x[j]);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (g0 + j >= group) break;
#pragma unroll
          for (int e = 0; e < kVec; ++e) {
            w0[e] += fold_term(alpha0, beta0, x[j][e]);
            w1[e] += fold_term(alpha1, beta1, x[j][e]);
          }
        }
      }
      store(weights + h * 2 * dim, c, w0);
      store(weights + h * 2 * dim + dim, c, w1);
    }
  } else {
    for (int i = threadIdx.x; i < a.num_q_heads * chunks; i += blockDim.x) {
      const int h = i / chunks, c = i - h * chunks;
      float x[kVec];
      query_to_float<Q, kVec>(query + std::int64_t(h) * a.q_stride_head + c * kVec, x);
      store(weights + h * dim, c, x);
    }
  }
}

// Where a lane group's items of one round are, and which of their pieces this lane holds.
struct WideLanes {
  int lanes, groups, slot, group, chunks, heads;
};

// A warp's position in its run of pages: the current window of 32 pages (block ids one per lane)
// and the first (page, KV head) item of the round in it. `items` <= 0: the run is done.
struct RoundCursor {
  int window, first_item, items;
};

// The next round of a cursor; true where it moved to a new window (whose block ids the caller
// loads).
__device__ __forceinline__ bool next_round(RoundCursor& c, int step, int heads, int run_end) {
  c.first_item += step;
  if (c.first_item < c.items) return false;
  c.window += 32;
  c.first_item = 0;
  c.items = min(32, run_end - c.window) * heads;
  return true;
}

// Rounds of summary loads per warp: each round is staged in shared memory (16 bytes per lane per
// piece), so the loads hold no registers, and a warp keeps stages - 1 rounds in flight while it
// scores one. Three stages (96 KiB per thread block; two thread blocks per multiprocessor on
// sm_90) where the device's shared memory per block allows it, else two (64 KiB).
constexpr int kMaxScoreStages = 3;
// Bytes of one round of one warp: kScoreSlots pieces of both rows, 16 bytes per lane each.
constexpr int kScoreStageBytes = kScoreSlots * 2 * 32 * 16;
// Bytes of one stage of every warp of a thread block.
constexpr int kScoreStageBlockBytes = kScoreStageBytes * (kScoreThreads / 32);

// Issues one round's copies into this lane's part of a stage (`stage`: its shared address): for
// r < kRounds, item first_item + r * groups + group of the cursor's window (block ids in
// lane_block, lane j holding page j), both rows, K pieces per lane; piece (r, k, row) of lane l
// at stage + ((r * K + k) * 2 + row) * 512 + 16 * l. Missing items and pieces are zero-filled.
// Returns bit r set where item r is a valid (page, KV head).
template <class T, int K, int kRounds>
__device__ __forceinline__ unsigned issue_round(const SelectArgs& a, const T* meta,
                                                std::int32_t lane_block, int first_item, int items,
                                                const WideLanes& w, std::uint32_t stage) {
  constexpr int kVec = kChunkElems<T>;
  unsigned valid_bits = 0;
#pragma unroll
  for (int r = 0; r < kRounds; ++r) {
    const int item = first_item + r * w.groups + w.group;
    const int page = item / w.heads, h = item - page * w.heads;
    const std::int64_t block = __shfl_sync(0xffffffffu, lane_block, min(page, 31));
    const bool valid = item < items && block >= 0 && block < a.num_blocks;
    valid_bits |= unsigned(valid) << r;
    const T* row = meta + (valid ? block : 0) * a.meta_stride_block + h * a.meta_stride_head;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int chunk = w.slot + k * w.lanes;
      const bool live = valid && chunk < w.chunks;
      const T* lo = live ? row + chunk * kVec : meta;
      const T* hi = live ? row + a.meta_stride_row + chunk * kVec : meta;
      const std::uint32_t at = stage + std::uint32_t((r * K + k) * 2) * 512u;
      ptx::cp_async_16(at, lo, !live);
      ptx::cp_async_16(at + 512u, hi, !live);
    }
  }
  return valid_bits;
}

// Up to two thread blocks per multiprocessor (the staging's shared memory: 96 KiB each, plus the
// weights).
// Q: the query's type; MT: the summaries'.
template <class Q, class MT, int K, ScoreMode M>
__global__ void __launch_bounds__(kScoreThreads, 2)
    score_pages_wide_kernel(const __grid_constant__ SelectArgs a) {
  // Folded: [num_kv_heads][2][head_dim] weights; per head: [num_q_heads][head_dim] queries; then
  // the warps' staging (score_stages * kScoreStageBlockBytes) after them.
  extern __shared__ __align__(16) float weights[];
  // Launched while the previous kernel drains (sm_90): nothing is read before it is done. The
  // selection kernel may then be scheduled: it waits for this grid before reading scores, reads
  // only inputs before that (complete now), and every thread block of this one is resident or
  // done by the time the trigger takes effect.
  ptx::wait_for_previous_grid();
  ptx::allow_dependent_grids();
  constexpr int kVec = kChunkElems<MT>;
  constexpr int kRounds = kScoreSlots / K;  // items per lane group per round
  const int b = blockIdx.y;
  int begin, end;
  if (!scored_pages(a, b, begin, end)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kScoreThreads / 32;
  const int per_warp = (end - begin + kWarps - 1) / kWarps;
  const int run_begin = begin + warp * per_warp, run_end = min(end, run_begin + per_warp);
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  const MT* meta = reinterpret_cast<const MT*>(a.meta);
  WideLanes w;
  w.lanes = a.lanes_per_head;  // a power of two, 32 / lanes groups per warp
  w.groups = 32 / w.lanes;
  w.slot = lane & (w.lanes - 1);
  w.group = lane / w.lanes;
  w.chunks = a.head_dim / kVec;  // 16-byte chunks per summary row
  w.heads = a.num_kv_heads;
  const int step = kRounds * w.groups;  // items per round
  const int dim = a.head_dim;
  const int group = a.num_q_heads / w.heads;
  const int weight_floats = (M == ScoreMode::Folded ? 2 * w.heads : a.num_q_heads) * dim;
  const int stages = a.score_stages;

  // The warp walks its run in windows of 32 pages (block ids one per lane) and each window's
  // (page, KV head) items in rounds, with two cursors: `ahead` issues the copies of round
  // t + stages - 1 while `at` scores round t. Every issue commits one copy group (empty past the
  // run's end), so waiting until stages - 1 groups are pending leaves round t complete.
  // The first rounds are issued before the weights are built (the query read while they fly).
  const int first_items = min(32, run_end - run_begin) * w.heads;  // <= 0 for a warp without pages
  RoundCursor ahead{run_begin, 0, first_items};
  std::int32_t lane_block = run_begin + lane < run_end ? table[run_begin + lane] : -1;
  const std::uint32_t staging = ptx::smem_addr(weights + weight_floats) +
                                std::uint32_t(warp * stages * kScoreStageBytes + 16 * lane);
  static_assert(kMaxScoreStages * kScoreSlots <= 32, "the items' validity fits one word");
  unsigned valid_ring = 0;  // bits [s * kRounds, (s + 1) * kRounds): the items of stage s
  int ahead_stage = 0;
  const auto issue = [&]() {
    // The stage refilled here was read in the previous iteration: keep those reads before it.
    asm volatile("" ::: "memory");
    if (ahead.items > 0) {
      const unsigned bits =
          issue_round<MT, K, kRounds>(a, meta, lane_block, ahead.first_item, ahead.items, w,
                                      staging + std::uint32_t(ahead_stage * kScoreStageBytes));
      const unsigned mask = ((1u << kRounds) - 1u) << (ahead_stage * kRounds);
      valid_ring = (valid_ring & ~mask) | (bits << (ahead_stage * kRounds));
      if (next_round(ahead, step, w.heads, run_end) && ahead.items > 0) {
        lane_block = ahead.window + lane < run_end ? table[ahead.window + lane] : -1;
      }
    }
    ptx::cp_async_commit();
    ahead_stage = ahead_stage + 1 == stages ? 0 : ahead_stage + 1;
  };
  for (int s = 0; s < stages - 1; ++s) issue();

  const Q* query = reinterpret_cast<const Q*>(a.query) + b * a.q_stride_batch;
  if (a.query_chunked) {
    build_weights_chunked<Q, MT, M>(a, query, w.chunks, weights);
  } else if constexpr (M == ScoreMode::Folded) {
    float alpha0, beta0, alpha1, beta1;
    fold_coefficients(a.kind, 0, alpha0, beta0);
    fold_coefficients(a.kind, 1, alpha1, beta1);
    for (int i = threadIdx.x; i < w.heads * dim; i += blockDim.x) {
      const int h = i / dim, d = i - h * dim;
      float w0 = 0.0f, w1 = 0.0f;
      for (int g = 0; g < group; ++g) {
        const float x = to_float(query[(h * group + g) * a.q_stride_head + d]);
        w0 += fold_term(alpha0, beta0, x);
        w1 += fold_term(alpha1, beta1, x);
      }
      weights[h * 2 * dim + quarter_slot<kVec>(d, w.chunks)] = w0;
      weights[h * 2 * dim + dim + quarter_slot<kVec>(d, w.chunks)] = w1;
    }
  } else {
    for (int i = threadIdx.x; i < a.num_q_heads * dim; i += blockDim.x) {
      const int h = i / dim, d = i - h * dim;
      weights[h * dim + quarter_slot<kVec>(d, w.chunks)] = to_float(query[h * a.q_stride_head + d]);
    }
  }
  __syncthreads();

  float* scores = a.scores + std::int64_t(b) * w.heads * a.max_blocks;
  RoundCursor at{run_begin, 0, first_items};
  int at_stage = 0;
  // Each lane reads back only the pieces it copied itself: its own wait makes them visible.
  const uint4* staged = reinterpret_cast<const uint4*>(reinterpret_cast<const char*>(weights) +
                                                       std::size_t(weight_floats) * sizeof(float) +
                                                       warp * stages * kScoreStageBytes) +
                        lane;
  while (at.items > 0) {
    // Refill the stage scored in the previous iteration, then wait for this one's.
    issue();
    if (stages == kMaxScoreStages) {
      ptx::cp_async_wait<kMaxScoreStages - 1>();
    } else {
      ptx::cp_async_wait<1>();
    }
    uint4 lo[kRounds][K], hi[kRounds][K];
    const uint4* stage = staged + at_stage * (kScoreStageBytes / 16);
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
#pragma unroll
      for (int k = 0; k < K; ++k) {
        lo[r][k] = stage[((r * K + k) * 2) * 32];
        hi[r][k] = stage[((r * K + k) * 2 + 1) * 32];
      }
    }
    const unsigned valid = valid_ring >> (at_stage * kRounds);
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int item = at.first_item + r * w.groups + w.group;
      if (at.first_item + r * w.groups >= at.items) break;  // no group of the warp has one left
      const int page = item / w.heads, h = item - page * w.heads;
      float combined = 0.0f;
      if constexpr (M == ScoreMode::Folded) {
#pragma unroll
        for (int k = 0; k < K; ++k) {
          const int chunk = w.slot + k * w.lanes;
          if (chunk < w.chunks) {
            float l[kVec], u[kVec];
            chunk_to_float<MT>(lo[r][k], l);
            chunk_to_float<MT>(hi[r][k], u);
            const float* wp = weights + h * 2 * dim;
            combined += weighted_chunk<kVec>(wp, wp + dim, chunk, w.chunks, l, u);
          }
        }
        for (int o = w.lanes / 2; o > 0; o >>= 1) {
          combined += __shfl_xor_sync(0xffffffffu, combined, o);
        }
      } else {
        float l[K][kVec], u[K][kVec];
#pragma unroll
        for (int k = 0; k < K; ++k) {
          chunk_to_float<MT>(lo[r][k], l[k]);
          chunk_to_float<MT>(hi[r][k], u[k]);
        }
        for (int g = 0; g < group; ++g) {
          const float* q = weights + (h * group + g) * dim;
          float s = 0.0f;
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const int chunk = w.slot + k * w.lanes;
            if (chunk < w.chunks) s += query_chunk<M, kVec>(q, chunk, w.chunks, l[k], u[k]);
          }
          for (int o = w.lanes / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          combined = g == 0 ? s : a.reduce == GroupReduce::Sum ? combined + s : fmaxf(combined, s);
        }
      }
      if (w.slot == 0 && item < at.items) {
        if (!((valid >> r) & 1u) || isnan(combined)) combined = -INFINITY;
        scores[std::int64_t(h) * a.max_blocks + at.window + page] = combined;
      }
    }
    next_round(at, step, w.heads, run_end);
    at_stage = at_stage + 1 == stages ? 0 : at_stage + 1;
  }
  ptx::cp_async_wait<0>();  // only empty groups can be pending here
}

// ---------------------------------------------------------------------------------------------
// Scoring, folded and page-major: the kernel where the group's scores are summed (any group
// size) and a KV head's two summary rows are 16, 32 or 64 16-byte chunks (16-bit head_dim 64, 128,
// 256; float32 32, 64, 128; float8 128, 256, 512).
//
// A page's summary is P = num_kv_heads * L chunks (L: a KV head's two rows); chunk i is KV head
// i / L, row (i / C) % 2, chunk i % C of the row (C = L / 2). A pass of a page is JB * 32 chunks:
// lane l takes chunks j * 32 + l for j < JB, each multiplied by its kVec folded weights from shared
// memory (planar 16-byte words: consecutive lanes read consecutive words). A pass holds whole KV
// heads (L divides 32, or 32 divides L and LOCAL = L / 32 consecutive j's are one head), so the
// warp sums each head's chunks in one transposing butterfly over the lane bits: while a lane holds
// more than one sum, partners swap halves and add (log2(JB / LOCAL) levels of JB / LOCAL / 2, ...
// shuffles), then the one sum left is summed over the remaining lane bits: 9 shuffles for 8 heads
// of 32 lanes, where a reduction per head takes 40. Each warp streams a run of consecutive pages
// through a ring of shared-memory stages (cp.async; stages - 1 pages in flight while one is
// summed), the block ids read 32 pages at a time, a window ahead. A chunk's address is a lane part
// fixed for the kernel plus a part uniform over the warp (its j): no per-chunk index arithmetic in
// the page loop. P is whole passes (the host checks).

// Pages staged per warp by the folded kernel (stages - 1 in flight while one is summed).
constexpr int kMaxFoldedStages = 3;

template <class Q, class MT, int JB, int LOGL, int LOCAL>
__global__ void __launch_bounds__(kScoreThreads, 2)
    score_pages_folded_kernel(const __grid_constant__ SelectArgs a) {
  // Weights: [kVec / 4][P] float4; chunk i's kVec weights are words q * P + i.
  extern __shared__ __align__(16) float4 folded_weights[];
  ptx::wait_for_previous_grid();  // as the page-wide kernel
  ptx::allow_dependent_grids();
  constexpr int kVec = kChunkElems<MT>;
  constexpr int kWords = kVec / 4;
  constexpr int kLanesPerHead = 1 << LOGL;  // lanes holding one KV head's chunks of one j
  constexpr int kSums = JB / LOCAL;         // sums a lane holds per page: one per KV head it sees
  static_assert(JB % LOCAL == 0 && (kSums & (kSums - 1)) == 0 && kSums <= 8, "whole heads");
  constexpr int kHalvings = kSums == 1 ? 0 : kSums == 2 ? 1 : kSums == 4 ? 2 : 3;
  static_assert(kHalvings <= LOGL, "one sum per lane after the butterfly");
  constexpr int kPass = JB * 32;           // chunks per pass
  constexpr int kStageBytes = kPass * 16;  // one page's chunks of a pass, one warp
  const int b = blockIdx.y;
  int begin, end;
  if (!scored_pages(a, b, begin, end)) return;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  constexpr int kWarps = kScoreThreads / 32;
  const int heads = a.num_kv_heads;
  const int row_chunks = a.head_dim / kVec;       // C
  const int head_chunks = kLanesPerHead * LOCAL;  // L
  const int total = heads * head_chunks;          // P
  const int group = a.num_q_heads / heads;

  // The warp's run of pages, and the block ids of its first two windows of 32 pages (one per
  // lane; read while the weights are built).
  const int per_warp = (end - begin + kWarps - 1) / kWarps;
  const int run_begin = begin + warp * per_warp, run_end = min(end, run_begin + per_warp);
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  const auto window_of = [&](int first) {
    return first + lane < run_end ? table[first + lane] : std::int32_t(-1);
  };
  std::int32_t window = window_of(run_begin), window_next = window_of(run_begin + 32);

  // Folded weights of every chunk, a thread per chunk (fold_term).
  const Q* query = reinterpret_cast<const Q*>(a.query) + b * a.q_stride_batch;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / head_chunks, r = (i / row_chunks) & 1, c = i % row_chunks;
    float alpha, beta;
    fold_coefficients(a.kind, r, alpha, beta);
    float w[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) w[e] = 0.0f;
    for (int g = 0; g < group; ++g) {
      const Q* q = query + std::int64_t(h * group + g) * a.q_stride_head + c * kVec;
      float x[kVec];
      if (a.query_chunked) {
        query_to_float<Q, kVec>(q, x);
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) x[e] = to_float(q[e]);
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        w[e] += fold_term(alpha, beta, x[e]);
      }
    }
#pragma unroll
    for (int q = 0; q < kWords; ++q) {
      folded_weights[q * total + i] =
          make_float4(w[4 * q], w[4 * q + 1], w[4 * q + 2], w[4 * q + 3]);
    }
  }
  __syncthreads();

  if (run_begin >= run_end) return;
  const MT* meta = reinterpret_cast<const MT*>(a.meta);
  float* scores = a.scores + std::int64_t(b) * heads * a.max_blocks;
  // The lane's part of a chunk's offset in a block's summary; the j's part is uniform. With L <=
  // 32 the lane picks head lane / L of the j's heads, row and chunk; with L > 32 the lane is the
  // chunk and j picks head and row.
  const int lane_offset = LOCAL == 1 ? int((lane >> LOGL) * a.meta_stride_head +
                                           ((lane / row_chunks) & 1) * a.meta_stride_row) +
                                           (lane % row_chunks) * kVec
                                     : lane * kVec;
  // The lanes whose sums are written: after the halvings, the lowest lane of each run of lanes
  // holding the same sum; and which KV head of the pass that sum is.
  const bool writer = (lane & ((1 << (LOGL - kHalvings)) - 1)) == 0;
  int sum_index = 0;
#pragma unroll
  for (int level = 0; level < kHalvings; ++level) {
    if ((lane >> (LOGL - 1 - level)) & 1) sum_index += kSums >> (level + 1);
  }
  const int lane_head = sum_index * (32 / kLanesPerHead) + (lane >> LOGL);
  // The warp's ring of stages after the weights: stage s holds chunk j of lane l at byte
  // s * kStageBytes + j * 512 + l * 16.
  const int stages = a.score_stages;
  const int weights_bytes = total * kVec * 4;
  const std::uint32_t staging = ptx::smem_addr(folded_weights) + std::uint32_t(weights_bytes) +
                                std::uint32_t(warp * stages * kStageBytes + lane * 16);

  for (int pass0 = 0; pass0 < total; pass0 += kPass) {
    // Chunk j's offset past the lane's part: heads (j / LOCAL) * step on from the pass's first
    // head, the second row for odd j where a head spans two j's. Uniform over the warp.
    const std::int64_t pass_offset = std::int64_t(pass0 / head_chunks) * a.meta_stride_head;
    const std::int64_t head_step = (32 / kLanesPerHead) * a.meta_stride_head;
    const float4* weights = folded_weights + pass0 + lane;
    const int pass_head = pass0 / head_chunks;
    // A page's block id is a shuffle of its window's (the next window loaded a window ahead): no
    // table load is waited on per page.
    if (pass0 > 0) window = window_of(run_begin), window_next = window_of(run_begin + 32);
    int issue_page = run_begin, issue_stage = 0;
    unsigned valid_bits = 0;  // bit s: stage s holds a page whose block id is in the cache
    // Copies the next page's chunks into its stage (every lane its own chunks) and commits one
    // group, empty past the run.
    const auto issue = [&]() {
      if (issue_page < run_end) {
        const int r = issue_page - run_begin;
        const std::int32_t block = __shfl_sync(0xffffffffu, window, r & 31);
        if ((r & 31) == 31) {
          window = window_next;
          window_next = window_of(issue_page + 33);
        }
        // A block id outside the cache reads nothing (its stage is zero-filled; its score -inf).
        const bool valid = block >= 0 && block < a.num_blocks;
        const MT* base = meta + std::int64_t(valid ? block : 0) * a.meta_stride_block +
                         pass_offset + lane_offset;
        const std::uint32_t at = staging + std::uint32_t(issue_stage * kStageBytes);
#pragma unroll
        for (int j = 0; j < JB; ++j) {
          const MT* chunk = base + (j / LOCAL) * head_step;
          if (LOCAL == 2 && j % 2 == 1) chunk += a.meta_stride_row;
          ptx::cp_async_16(at + std::uint32_t(j * 512), valid ? chunk : meta, !valid);
        }
        valid_bits = (valid_bits & ~(1u << issue_stage)) | (unsigned(valid) << issue_stage);
      }
      ptx::cp_async_commit();
      ++issue_page;
      issue_stage = issue_stage + 1 == stages ? 0 : issue_stage + 1;
    };
    // One page's sums, reduced and written.
    const auto score = [&](const uint4(&v)[JB], bool valid, int page) {
      float sum[kSums];
#pragma unroll
      for (int n = 0; n < kSums; ++n) sum[n] = 0.0f;
#pragma unroll
      for (int j = 0; j < JB; ++j) {
        float x[kVec];
        chunk_to_float<MT>(v[j], x);
        float& s = sum[j / LOCAL];
#pragma unroll
        for (int q = 0; q < kWords; ++q) {
          const float4 w = weights[q * total + j * 32];
          s = fmaf(w.x, x[4 * q], s);
          s = fmaf(w.y, x[4 * q + 1], s);
          s = fmaf(w.z, x[4 * q + 2], s);
          s = fmaf(w.w, x[4 * q + 3], s);
        }
      }
#pragma unroll
      for (int level = 0; level < LOGL; ++level) {
        const int bit = LOGL - 1 - level;
        const int n = kSums >> level;
        if (n > 1) {
          const bool upper = (lane >> bit) & 1;
#pragma unroll
          for (int k = 0; k < n / 2; ++k) {
            const float send = upper ? sum[k] : sum[k + n / 2];
            const float keep = upper ? sum[k + n / 2] : sum[k];
            sum[k] = keep + __shfl_xor_sync(0xffffffffu, send, 1 << bit);
          }
        } else {
          sum[0] += __shfl_xor_sync(0xffffffffu, sum[0], 1 << bit);
        }
      }
      if (writer) {
        const int h = pass_head + lane_head;
        scores[std::int64_t(h) * a.max_blocks + page] =
            valid && !isnan(sum[0]) ? sum[0] : -INFINITY;
      }
    };
    // stages - 1 pages in flight while one is summed. Each lane reads back only the chunks it
    // copied itself: its own wait makes them visible.
    for (int k = 0; k + 1 < stages; ++k) issue();
    int stage = 0;
    for (int page = run_begin; page < run_end; ++page) {
      asm volatile("" ::: "memory");  // the stage refilled here was read in the last iteration
      issue();
      if (stages == kMaxFoldedStages) {
        ptx::cp_async_wait<kMaxFoldedStages - 1>();
      } else {
        ptx::cp_async_wait<1>();
      }
      uint4 v[JB];
      const uint4* staged = reinterpret_cast<const uint4*>(
          reinterpret_cast<const char*>(folded_weights) + weights_bytes +
          (warp * stages + stage) * kStageBytes + lane * 16);
#pragma unroll
      for (int j = 0; j < JB; ++j) v[j] = staged[j * 32];
      score(v, (valid_bits >> stage) & 1u, page);
      stage = stage + 1 == stages ? 0 : stage + 1;
    }
    ptx::cp_async_wait<0>();
  }
}

// ---------------------------------------------------------------------------------------------
// Scoring, row by row: the fallback for summaries whose rows are not 16-byte chunks (head_dim or
// a stride not a multiple of 16 bytes, or rows longer than 64 chunks).

// VEC consecutive elements of a summary row as floats, in one load when VEC > 1 (the caller
// checked the alignment).
template <class T, int VEC>
__device__ __forceinline__ void load_row(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else if constexpr (std::is_same_v<T, __nv_fp8_e4m3>) {
    static_assert(VEC == 4, "float8 rows load 4 bytes");
    const std::uint32_t v = *reinterpret_cast<const std::uint32_t*>(p);
    const uint2 pairs = fp8x4_to_pairs<__half>(v);
    const float2 lo = __half22float2(*reinterpret_cast<const __half2*>(&pairs.x));
    const float2 hi = __half22float2(*reinterpret_cast<const __half2*>(&pairs.y));
    out[0] = lo.x, out[1] = lo.y, out[2] = hi.x, out[3] = hi.y;
  } else if constexpr (std::is_same_v<T, float>) {
    static_assert(VEC == 4, "float rows load as float4");
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x, out[1] = v.y, out[2] = v.z, out[3] = v.w;
  } else {
    static_assert(VEC == 4, "16-bit rows load 8 bytes");
    const uint2 v = *reinterpret_cast<const uint2*>(p);
    const T* h = reinterpret_cast<const T*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) out[i] = to_float(h[i]);
  }
}

template <int VEC>
__device__ __forceinline__ float page_term(PageSummary kind, const float* q, const float (&lo)[VEC],
                                           const float (&hi)[VEC]) {
  float s = 0.0f;
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    const float a = q[v] * lo[v], b = q[v] * hi[v];
    s += kind == PageSummary::MinMax         ? fmaxf(a, b)
         : kind == PageSummary::MinMaxDamped ? fmaf(0.75f, fmaxf(a, b), 0.25f * fminf(a, b))
                                             : fmaf(q[v], lo[v], fabsf(q[v]) * hi[v]);
  }
  return s;
}

// Scores of pages [blockIdx.x * pages_per_block, ...) of sequence blockIdx.y, every KV head:
// one warp per (page, KV head), each lane VEC consecutive elements of head_dim at a time, the
// queries in shared memory.
template <class Q, class MT, int VEC>
__global__ void __launch_bounds__(kScoreThreads)
    score_pages_kernel(const __grid_constant__ SelectArgs a) {
  extern __shared__ float q[];    // [num_q_heads, head_dim]
  ptx::wait_for_previous_grid();  // as the page-wide kernel
  ptx::allow_dependent_grids();
  const int b = blockIdx.y;
  int begin, end;
  if (!scored_pages(a, b, begin, end)) return;
  const Q* query = reinterpret_cast<const Q*>(a.query) + b * a.q_stride_batch;
  for (int i = threadIdx.x; i < a.num_q_heads * a.head_dim; i += blockDim.x) {
    const int h = i / a.head_dim, d = i - h * a.head_dim;
    q[i] = to_float(query[h * a.q_stride_head + d]);
  }
  __syncthreads();
  const int group = a.num_q_heads / a.num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const MT* meta = reinterpret_cast<const MT*>(a.meta);
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  const int items = (end - begin) * a.num_kv_heads;
  for (int item = warp; item < items; item += warps) {
    const int page = begin + item / a.num_kv_heads, kvh = item % a.num_kv_heads;
    const std::int64_t block = table[page];
    float combined = -INFINITY;
    if (block >= 0 && block < a.num_blocks) {
      const MT* r0 = meta + block * a.meta_stride_block + kvh * a.meta_stride_head;
      const MT* r1 = r0 + a.meta_stride_row;
      const float* q0 = q + kvh * group * a.head_dim;
      for (int g = 0; g < group; ++g) {
        float s = 0.0f;
        for (int d = lane * VEC; d < a.head_dim; d += 32 * VEC) {
          float lo[VEC], hi[VEC];
          load_row<MT, VEC>(r0 + d, lo);
          load_row<MT, VEC>(r1 + d, hi);
          s += page_term<VEC>(a.kind, q0 + g * a.head_dim + d, lo, hi);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        combined = g == 0 ? s : a.reduce == GroupReduce::Sum ? combined + s : fmaxf(combined, s);
      }
      if (isnan(combined)) combined = -INFINITY;
    }
    if (lane == 0) {
      a.scores[(std::int64_t(b) * a.num_kv_heads + kvh) * a.max_blocks + page] = combined;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Top-k.

// A float's bits as an unsigned key with the same order (larger float, larger key); -0.0 is
// +0.0 first (they compare equal, so the lower page wins between them, as between other ties).
__device__ __forceinline__ std::uint32_t order_key(float f) {
  const std::uint32_t u = __float_as_uint(f + 0.0f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// What both selection kernels read and write for sequence b and KV head kvh.
struct SelectionRows {
  std::int64_t len;  // clamped_length
  int pages;
  const std::int32_t* table;  // the sequence's block ids
  std::int32_t* out;          // its selected ids for the KV head
};

__device__ __forceinline__ SelectionRows selection_rows(const SelectArgs& a, int kvh, int b) {
  SelectionRows r;
  r.len = clamped_length(a, b);
  r.pages = int((r.len + a.block_size - 1) / a.block_size);
  r.table = a.block_table + b * a.block_table_stride;
  r.out = a.out_table + b * a.out_table_stride_batch + kvh * a.out_table_stride_head;
  return r;
}

// The short case of both selection kernels: a sequence of at most `budget` pages keeps them all.
// It waits for the previous grid first (a kernel queued after the selection kernel waits for
// that grid alone, so it must follow both), then lets the kernel queued after it be scheduled.
__device__ void copy_whole_table(const SelectArgs& a, const std::int32_t* table, std::int32_t* out,
                                 int pages, std::int64_t len, int kvh, int b) {
  ptx::wait_for_previous_grid();
  ptx::allow_dependent_grids();
  for (int i = threadIdx.x; i < a.budget; i += blockDim.x) {
    const std::int32_t id = i < pages ? table[i] : -1;
    out[i] = id;
    if (a.hits && id >= 0 && id < a.num_blocks) atomicAdd(&a.hits[id], 1);
  }
  if (threadIdx.x == 0) {
    a.out_lens[b * a.out_lens_stride_batch + kvh * a.out_lens_stride_head] = std::int32_t(len);
  }
}

__device__ __forceinline__ void write_selected_lens(const SelectArgs& a, std::int64_t len, int last,
                                                    int kvh, int b) {
  a.out_lens[b * a.out_lens_stride_batch + kvh * a.out_lens_stride_head] = std::int32_t(
      std::int64_t(a.budget - 1) * a.block_size + len - std::int64_t(last) * a.block_size);
}

__device__ __forceinline__ void keep_block(const SelectArgs& a, std::int32_t* out, int at,
                                           std::int32_t id) {
  out[at] = id;
  if (a.hits && id >= 0 && id < a.num_blocks) atomicAdd(&a.hits[id], 1);
}

// Shared-memory top-k: one thread block of kTopKThreads per (sequence, KV head). The candidates'
// keys are read from the scores once into shared memory, with their minimum and maximum. A radix
// select then narrows a key range [lo, hi] known to hold the keep-th largest candidate: each pass
// bins the keys in the range into at most 2048 bins of equal width over exactly that range (so
// the first pass splits the keys whatever their magnitude: neighbouring pages' scores share
// their top bits, and fixed digits of the key would put them in a handful of bins) and keeps the
// bin holding the keep-th largest. It stops when that bin's keys are all kept (the usual case
// after one pass: the top of a score distribution is sparse) or the range is one key value (the
// lowest-indexed pages equal to it are kept); otherwise the next range is the bin, tightened to
// its keys' minimum and maximum. A pass costs three barriers; the bins' counts are shared-memory
// atomics, the lanes of a warp that share a bin adding together. Each thread then takes a run of
// consecutive candidates, and one block scan of (greater, equal) counts gives every kept page its
// place in logical order. Runs are a power of two long and the keys padded by one word every 32,
// so that the runs read without bank conflicts.
// 1024 threads: the kernel waits on its chain of barriers and shared-memory round trips more than
// on its instructions, and more warps shorten it (on an H200, 256 threads for tables of up to 2048
// pages, 8 candidates a thread, took 17-21 us for 8 x 2048 pages against 10 us).
constexpr int kTopKThreads = 1024;
constexpr int kRadixBits = 11;
constexpr int kRadixBins = 1 << kRadixBits;
static_assert(kRadixBins == 2 * kTopKThreads, "each thread scans two bins");
// Score loads in flight per thread, and block ids read ahead (every id of a table of up to 8192
// pages).
constexpr int kTopKPerThread = 8;
// Candidates held in shared memory; the (greater, equal) counts are scanned packed in 16 bits
// each, so they must stay below 32768.
constexpr int kTopKMaxPages = 32767;

// The kernel's static shared memory (histogram, per-warp partials, scan scratch, the pass's
// result), with a margin.
constexpr int kTopKStaticSmemBytes = (kRadixBins + 3 * 32 + 33 + 4) * 4 + 1024;

__device__ __forceinline__ int padded(int i) { return i + (i >> 5); }

inline std::size_t topk_smem_bytes(int max_blocks) {
  return std::size_t(max_blocks + max_blocks / 32 + 1) * sizeof(std::uint32_t);
}

// The block's minimum and maximum of the threads' values (every thread gets both). One barrier;
// `lo_part` and `hi_part` hold 32 words each and must not be rewritten before every thread has
// passed a later barrier.
__device__ __forceinline__ void block_min_max(std::uint32_t& lo, std::uint32_t& hi,
                                              std::uint32_t* lo_part, std::uint32_t* hi_part) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  if (lane == 0) {
    lo_part[warp] = lo;
    hi_part[warp] = hi;
  }
  __syncthreads();
  lo = __reduce_min_sync(0xffffffffu, lane < warps ? lo_part[lane] : 0xffffffffu);
  hi = __reduce_max_sync(0xffffffffu, lane < warps ? hi_part[lane] : 0u);
}

__global__ void __launch_bounds__(kTopKThreads)
    select_pages_kernel(const __grid_constant__ SelectArgs a) {
  extern __shared__ std::uint32_t keys[];  // padded candidate index -> key
  __shared__ int histogram[kRadixBins];
  __shared__ std::uint32_t lo_part[32], hi_part[32];
  __shared__ int warp_total[32];
  __shared__ int scratch[33];
  // The pass's outcome: the next range, how many of its keys are kept, and whether it is final.
  __shared__ std::uint32_t next_lo, next_hi;
  __shared__ int next_remaining, next_final;
  const int kvh = blockIdx.x, b = blockIdx.y;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const auto [len, pages, table, out] = selection_rows(a, kvh, b);
  if (pages <= a.budget) {
    copy_whole_table(a, table, out, pages, len, kvh, b);
    return;
  }
  const int first = a.num_sink_pages, last = pages - 1;  // candidates [first, last)
  const int n = last - first;                            // > keep, since pages > budget
  const int keep = max(0, a.budget - a.num_sink_pages - 1);
  // Sinks and the last page do not depend on the scores.
  for (int p = threadIdx.x; p < first; p += kTopKThreads) keep_block(a, out, p, table[p]);
  if (threadIdx.x == 0) {
    keep_block(a, out, a.budget - 1, table[last]);
    write_selected_lens(a, len, last, kvh, b);
  }
  for (int i = threadIdx.x; i < kRadixBins; i += kTopKThreads) histogram[i] = 0;
  // Each thread places a run of `run` consecutive candidates at the end; their block ids (up to
  // kTopKPerThread of them) are read now, while the scoring kernel runs, not after the select.
  int run = 1;
  while (run * kTopKThreads < n) run <<= 1;
  const int run_begin = threadIdx.x * run;
  std::int32_t ids[kTopKPerThread];
#pragma unroll
  for (int j = 0; j < kTopKPerThread; ++j) {
    ids[j] = j < run && run_begin + j < n ? table[first + run_begin + j] : -1;
  }
  ptx::wait_for_previous_grid();  // the scores are the scoring kernel's
  const float* scores = a.scores + (std::int64_t(b) * a.num_kv_heads + kvh) * a.max_blocks + first;

  // The keys, kTopKPerThread score loads in flight per thread, and their minimum and maximum.
  // Candidate i + j * kTopKThreads sits j * kPaddedStride words after candidate i (kTopKThreads is
  // a multiple of 32), so each thread's loads and stores take one address and constant offsets.
  std::uint32_t lo = 0xffffffffu, hi = 0u;
  constexpr int kPaddedStride = kTopKThreads + kTopKThreads / 32;
  for (int base = 0; base < n; base += kTopKPerThread * kTopKThreads) {
    const int i0 = base + int(threadIdx.x);
    const float* src = scores + i0;
    std::uint32_t* dst = keys + padded(i0);
    std::uint32_t k[kTopKPerThread];
#pragma unroll
    for (int j = 0; j < kTopKPerThread; ++j)
      k[j] = i0 + j * kTopKThreads < n ? order_key(src[j * kTopKThreads]) : 0u;
#pragma unroll
    for (int j = 0; j < kTopKPerThread; ++j) {
      if (i0 + j * kTopKThreads < n) {
        dst[j * kPaddedStride] = k[j];
        lo = min(lo, k[j]);
        hi = max(hi, k[j]);
      }
    }
  }
  block_min_max(lo, hi, lo_part, hi_part);  // its barrier also publishes the keys

  // Kept candidates: keys above `threshold`, and the first `equal_kept` (lowest pages) equal to
  // it. Scores are never NaN, so no key is 0xffffffff: that threshold keeps nothing.
  std::uint32_t threshold = 0xffffffffu;
  int equal_kept = 0;
  int remaining = keep;  // how many of the keys in [lo, hi] are kept (the largest)
  // Each pass narrows the range's width at least 1024-fold: at most four passes.
  while (keep > 0) {
    if (lo == hi) {  // one key value: the lowest-indexed pages holding it are kept
      threshold = lo;
      equal_kept = remaining;
      break;
    }
    const int shift = max(0, 32 - __clz(int(hi - lo)) - kRadixBits);
    for (int base = 0; base < n; base += kTopKThreads) {
      const int i = base + threadIdx.x;
      const std::uint32_t k = i < n ? keys[padded(i)] : 0u;
      const bool counted = i < n && k >= lo && k <= hi;
      const unsigned voters = __ballot_sync(0xffffffffu, counted);
      if (voters == 0) continue;
      // The bin of the warp's first counted lane is counted once for all lanes that share it
      // (a dominant bin costs one atomic per warp); the others add alone.
      const std::uint32_t bin = counted ? (k - lo) >> shift : 0xffffffffu;
      const int leader = __ffs(voters) - 1;
      const std::uint32_t leader_bin = __shfl_sync(0xffffffffu, bin, leader);
      const unsigned sharing = __ballot_sync(0xffffffffu, bin == leader_bin);
      if (lane == leader) {
        atomicAdd(&histogram[bin], __popc(sharing));
      } else if (counted && bin != leader_bin) {
        atomicAdd(&histogram[bin], 1);
      }
    }
    __syncthreads();
    // Thread t holds bins 2047 - 2t and 2046 - 2t (the largest keys first) and clears them for
    // the next pass; a block scan counts the keys in the bins above.
    const int upper_bin = kRadixBins - 1 - 2 * int(threadIdx.x);
    const int upper = histogram[upper_bin], lower = histogram[upper_bin - 1];
    histogram[upper_bin] = 0;
    histogram[upper_bin - 1] = 0;
    int inclusive = upper + lower;
    for (int o = 1; o < 32; o <<= 1) {
      const int y = __shfl_up_sync(0xffffffffu, inclusive, o);
      if (lane >= o) inclusive += y;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    const int above = __reduce_add_sync(0xffffffffu, lane < warp ? warp_total[lane] : 0) +
                      inclusive - (upper + lower);
    // Exactly one thread holds the bin where the remaining-th largest key falls (the range holds
    // at least `remaining` keys).
    int bin = -1, in_bin = 0, left = 0;
    if (above < remaining && remaining <= above + upper) {
      bin = upper_bin, in_bin = upper, left = remaining - above;
    } else if (above + upper < remaining && remaining <= above + upper + lower) {
      bin = upper_bin - 1, in_bin = lower, left = remaining - above - upper;
    }
    if (bin >= 0) {
      const std::uint32_t bin_lo = lo + (std::uint32_t(bin) << shift);
      const std::uint32_t bin_hi = std::uint32_t(
          min(std::uint64_t(hi), std::uint64_t(bin_lo) + (std::uint64_t(1) << shift) - 1));
      next_lo = bin_lo;
      next_hi = bin_hi;
      next_remaining = left;
      // Final when the bin is one key value, or all of its keys are kept (keep < n, so a bin
      // kept whole does not start at key 0).
      next_final = shift == 0 ? 1 : (in_bin == left && bin_lo > 0) ? 2 : 0;
    }
    __syncthreads();
    lo = next_lo;
    hi = next_hi;
    remaining = next_remaining;
    if (next_final == 1) {
      threshold = lo;
      equal_kept = remaining;
      break;
    }
    if (next_final == 2) {  // every key >= lo
      threshold = lo - 1;
      equal_kept = 0;
      break;
    }
    // The next range: the bin's keys' own minimum and maximum.
    std::uint32_t bin_min = 0xffffffffu, bin_max = 0u;
    for (int i = threadIdx.x; i < n; i += kTopKThreads) {
      const std::uint32_t k = keys[padded(i)];
      if (k >= lo && k <= hi) {
        bin_min = min(bin_min, k);
        bin_max = max(bin_max, k);
      }
    }
    block_min_max(bin_min, bin_max, lo_part, hi_part);
    lo = bin_min;
    hi = bin_max;
  }

  // Place the kept candidates: each thread its run of consecutive ones.
  int greater = 0, equal = 0;
  for (int j = 0; j < run; ++j) {
    const int i = run_begin + j;
    if (i < n) {
      const std::uint32_t k = keys[padded(i)];
      greater += k > threshold;
      equal += k == threshold;
    }
  }
  int total;
  const int before = block_exclusive_scan((greater << 16) | equal, &total, scratch);
  int greater_before = before >> 16, equal_before = before & 0xffff;
  std::int32_t* const dst = out;  // a lambda may not capture a structured binding (C++17)
  const auto place = [&](int i, std::int32_t id) {
    const std::uint32_t k = keys[padded(i)];
    if (k > threshold) {
      keep_block(a, dst, first + greater_before + min(equal_before, equal_kept), id);
      ++greater_before;
    } else if (k == threshold) {
      if (equal_before < equal_kept) keep_block(a, dst, first + greater_before + equal_before, id);
      ++equal_before;
    }
  };
#pragma unroll
  for (int j = 0; j < kTopKPerThread; ++j) {
    if (j < run && run_begin + j < n) place(run_begin + j, ids[j]);
  }
  for (int j = kTopKPerThread; j < run && run_begin + j < n; ++j) {
    place(run_begin + j, table[first + run_begin + j]);
  }
}

// The same selection for tables too long for shared memory: one thread block of 512 per
// (sequence, KV head), four 8-bit radix passes over the scores in global memory, and two block
// scans per 512 pages to place the kept ones. Also the whole call where the table is no wider
// than the budget (every sequence is copied; no scores).
constexpr int kSelectThreads = 512;

__global__ void __launch_bounds__(kSelectThreads)
    select_pages_global_kernel(const __grid_constant__ SelectArgs a) {
  __shared__ int scratch[33];
  __shared__ int histogram[256];
  __shared__ std::uint32_t prefix_shared;
  __shared__ int remaining_shared;
  const int kvh = blockIdx.x, b = blockIdx.y;
  // Launched while the previous kernel drains: the scoring kernel, or, where nothing is scored,
  // whatever came before the call, which may have written the lengths and the table.
  ptx::wait_for_previous_grid();
  ptx::allow_dependent_grids();
  const auto [len, pages, table, out] = selection_rows(a, kvh, b);
  if (pages <= a.budget) {
    copy_whole_table(a, table, out, pages, len, kvh, b);
    return;
  }
  const float* scores = a.scores + (std::int64_t(b) * a.num_kv_heads + kvh) * a.max_blocks;
  const int first = a.num_sink_pages, last = pages - 1;  // candidates [first, last)
  const int keep = a.budget - a.num_sink_pages - 1;
  // Radix select: the key of the keep-th largest candidate, 8 bits at a time from the top.
  std::uint32_t prefix = 0, mask = 0;
  int remaining = keep;
  if (keep > 0) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) histogram[i] = 0;
      __syncthreads();
      for (int base = first; base < last; base += blockDim.x) {
        const int p = base + threadIdx.x;
        const std::uint32_t k = p < last ? order_key(scores[p]) : 0u;
        const bool counted = p < last && (k & mask) == prefix;
        // Plain increments: grouping a warp's lanes by bin first (__match_any_sync) costs more
        // the more distinct bins the warp holds.
        if (counted) atomicAdd(&histogram[(k >> shift) & 255u], 1);
      }
      __syncthreads();
      // Thread t holds digit 255 - t: an inclusive scan counts the candidates at or above it.
      const int count = threadIdx.x < 256 ? histogram[255 - threadIdx.x] : 0;
      int total;
      const int above = block_exclusive_scan(count, &total, scratch);
      if (threadIdx.x < 256 && above < remaining && remaining <= above + count) {
        prefix_shared = prefix | (std::uint32_t(255 - threadIdx.x) << shift);
        remaining_shared = remaining - above;
      }
      __syncthreads();
      prefix = prefix_shared;
      remaining = remaining_shared;
      mask |= 255u << shift;
      __syncthreads();
    }
  }
  // Now `prefix` is the threshold key and `remaining` how many candidates equal to it are kept
  // (the lowest pages). Keep pages in logical order: sinks, chosen candidates, the last page.
  const std::uint32_t threshold = prefix;
  int equal_before = 0, written = 0;
  for (int base = 0; base < pages; base += blockDim.x) {
    const int p = base + threadIdx.x;
    bool candidate = keep > 0 && p >= first && p < last;
    std::uint32_t k = candidate ? order_key(scores[p]) : 0;
    const int equal = candidate && k == threshold;
    int equal_total;
    const int equal_rank = equal_before + block_exclusive_scan(equal, &equal_total, scratch);
    equal_before += equal_total;
    const int kept =
        p < pages && (p < first || p == last ||
                      (candidate && (k > threshold || (equal && equal_rank < remaining))));
    int kept_total;
    const int at = written + block_exclusive_scan(kept, &kept_total, scratch);
    written += kept_total;
    if (kept) keep_block(a, out, at, table[p]);
  }
  if (threadIdx.x == 0) write_selected_lens(a, len, last, kvh, b);
}

// Threads of a page-summary kernel (update and build): one per kPerThread elements of a page's
// (head, dim) tile, whole warps, 64 to 1024.
int summary_threads(int num_heads, int head_dim) {
  const int elements = num_heads * head_dim;
  return std::min(1024, std::max(64, (elements / kPerThread + 31) / 32 * 32));
}

}  // namespace

void update_page_meta(const ReshapeAndCacheParams& p, Stream stream) {
  const char* op = "reshape_and_cache";
  UpdateArgs a;
  a.key = static_cast<const char*>(p.key);
  a.key_stride_token = p.key_stride_token;
  a.key_stride_head = p.key_stride_head;
  a.meta = p.page_meta.data;
  a.meta_stride_block = p.page_meta.stride_block;
  a.meta_stride_head = p.page_meta.stride_head;
  a.meta_stride_row = p.page_meta.stride_row;
  a.slot_mapping = p.slot_mapping;
  a.num_tokens = p.num_tokens;
  a.num_slots = p.num_blocks * p.block_size;
  a.block_size = p.block_size;
  a.num_heads = p.num_heads;
  a.head_dim = p.head_dim;
  a.kind = p.summary;
  a.quantised = p.cache_dtype == DType::Float8E4M3FN;
  a.k_scale = p.k_scale;
  const int threads = summary_threads(p.num_heads, p.head_dim);
  const unsigned grid = unsigned(std::min<std::int64_t>(p.num_tokens, 1 << 30));
  const void* kernel = dispatch_float_dtype(p.dtype, op, [&](auto type) {
    using T = typename decltype(type)::type;
    return p.page_meta.fp8
               ? reinterpret_cast<const void*>(update_page_meta_kernel<T, __nv_fp8_e4m3>)
               : reinterpret_cast<const void*>(update_page_meta_kernel<T, T>);
  });
  launch(kernel, dim3(grid), dim3(threads), 0, as_stream(stream), a, op, "update_page_meta_kernel");
}

void build_page_meta(const BuildPageMetaParams& p, Stream stream) {
  const char* op = "build_page_meta";
  DeviceGuard guard(p.device_index, op);
  BuildArgs a;
  a.key_cache = static_cast<const char*>(p.key_cache.data);
  a.kc_stride_block = p.key_cache.stride_block;
  a.kc_stride_token = p.key_cache.stride_token;
  a.kc_stride_head = p.key_cache.stride_head;
  a.meta = p.page_meta.data;
  a.meta_stride_block = p.page_meta.stride_block;
  a.meta_stride_head = p.page_meta.stride_head;
  a.meta_stride_row = p.page_meta.stride_row;
  a.block_table = p.block_table;
  a.block_table_stride = p.block_table_stride;
  a.seq_lens = p.seq_lens;
  a.num_blocks = p.num_blocks;
  a.block_size = p.block_size;
  a.num_heads = p.num_heads;
  a.head_dim = p.head_dim;
  a.kind = p.summary;
  a.k_scale = p.k_scale;
  const int threads = summary_threads(p.num_heads, p.head_dim);
  const void* kernel = nullptr;
  if (p.page_meta.fp8) {
    kernel =
        p.dtype == DType::Float8E4M3FN
            ? reinterpret_cast<const void*>(build_page_meta_kernel<__nv_fp8_e4m3, __nv_fp8_e4m3>)
            : dispatch_float_dtype(p.dtype, op, [&](auto type) {
                using T = typename decltype(type)::type;
                return reinterpret_cast<const void*>(build_page_meta_kernel<T, __nv_fp8_e4m3>);
              });
  } else if (p.dtype == DType::Float8E4M3FN) {  // a float8 cache's summaries in meta_dtype
    kernel = dispatch_float_dtype(p.meta_dtype, op, [&](auto type) {
      using M = typename decltype(type)::type;
      return reinterpret_cast<const void*>(build_page_meta_kernel<__nv_fp8_e4m3, M>);
    });
  } else {
    kernel = dispatch_float_dtype(p.dtype, op, [&](auto type) {
      using T = typename decltype(type)::type;
      return reinterpret_cast<const void*>(build_page_meta_kernel<T, T>);
    });
  }
  launch(kernel, dim3(unsigned(p.max_blocks), unsigned(p.batch)), dim3(threads), 0,
         as_stream(stream), a, op, "build_page_meta_kernel");
}

void select_pages(const SelectPagesParams& p, Stream stream) {
  const char* op = "select_pages";
  DeviceGuard guard(p.device_index, op);
  SelectArgs a;
  a.query = static_cast<const char*>(p.query);
  a.q_stride_batch = p.q_stride_batch;
  a.q_stride_head = p.q_stride_head;
  a.meta = static_cast<const char*>(p.page_meta.data);
  a.meta_stride_block = p.page_meta.stride_block;
  a.meta_stride_head = p.page_meta.stride_head;
  a.meta_stride_row = p.page_meta.stride_row;
  a.block_table = p.block_table;
  a.block_table_stride = p.block_table_stride;
  a.seq_lens = p.seq_lens;
  a.out_table = p.out_table;
  a.out_table_stride_batch = p.out_table_stride_batch;
  a.out_table_stride_head = p.out_table_stride_head;
  a.out_lens = p.out_lens;
  a.out_lens_stride_batch = p.out_lens_stride_batch;
  a.out_lens_stride_head = p.out_lens_stride_head;
  a.hits = p.hits;
  a.scores = p.scores;
  a.num_blocks = p.num_blocks;
  a.max_blocks = p.max_blocks;
  a.num_q_heads = p.num_q_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.head_dim = p.head_dim;
  a.block_size = p.block_size;
  a.budget = p.budget;
  a.num_sink_pages = p.num_sink_pages;
  a.kind = p.summary;
  a.reduce = p.group_reduce;
  a.lanes_per_head = 32;
  cudaStream_t s = as_stream(stream);
  const dim3 select_grid(unsigned(p.num_kv_heads), unsigned(p.batch));
  if (p.max_blocks <= p.budget) {
    // No sequence can have more pages than the budget (the table's width bounds them): nothing
    // is scored, and one kernel copies the table per KV head.
    launch_after(reinterpret_cast<const void*>(select_pages_global_kernel), select_grid,
                 dim3(kSelectThreads), 0, s, a, device_info(p.device_index).overlaps_launches(), op,
                 "select_pages_kernel");
    return;
  }
  const DeviceInfo info = device_info(p.device_index);
  const int group = p.num_q_heads / p.num_kv_heads;

  // Scoring. Page-wide where every summary row is whole 16-byte chunks (at most 64 of them).
  const std::uint64_t element = p.page_meta.fp8 ? 1 : dtype_size(p.dtype);  // of a summary
  // Whether `elements` summary elements are a whole number of `bytes`.
  const auto whole = [&](std::int64_t elements, std::uint64_t bytes) {
    return (std::uint64_t(elements) * element) % bytes == 0;
  };
  // Whether every summary row starts `bytes`-aligned and is whole units of `bytes` long.
  const auto meta_rows_aligned = [&](std::uint64_t bytes) {
    return reinterpret_cast<std::uintptr_t>(p.page_meta.data) % bytes == 0 &&
           whole(p.head_dim, bytes) && whole(p.page_meta.stride_block, bytes) &&
           whole(p.page_meta.stride_head, bytes) && whole(p.page_meta.stride_row, bytes);
  };
  const int chunks = int(std::uint64_t(p.head_dim) * element / 16);
  const int smem_optin = info.max_shared_per_block;
  const bool folded = group > 1 && p.group_reduce == GroupReduce::Sum;
  const int weights_bytes = int((folded ? 2 * p.num_kv_heads : p.num_q_heads) * p.head_dim * 4);
  // Page-wide scoring stages as many rounds as the device's shared memory per block allows.
  const int wide_stages =
      weights_bytes + kMaxScoreStages * kScoreStageBlockBytes <= smem_optin ? kMaxScoreStages : 2;
  const bool wide = meta_rows_aligned(16) && chunks <= 64 &&
                    weights_bytes + wide_stages * kScoreStageBlockBytes <= smem_optin;
  // Both 16-byte-chunk kernels read the query in chunks where its rows allow (the row-by-row
  // kernel reads it element by element whatever this says).
  const std::uint64_t q_element = dtype_size(p.dtype);
  a.query_chunked = reinterpret_cast<std::uintptr_t>(p.query) % 16 == 0 &&
                    (std::uint64_t(p.q_stride_batch) * q_element) % 16 == 0 &&
                    (std::uint64_t(p.q_stride_head) * q_element) % 16 == 0;
  DecodeLaunch score{};
  score.threads = kScoreThreads;
  // Page-major folded scoring where the group's scores are summed (or there is one query head
  // per KV head) and a KV head's two rows are 16, 32 or 64 chunks.
  const int head_chunks = 2 * chunks;
  // Chunks per lane per pass: the largest of 8, 4, 2, 1 that makes the page whole passes.
  const int page_chunks = p.num_kv_heads * head_chunks;
  const int jb = page_chunks % 256 == 0   ? 8
                 : page_chunks % 128 == 0 ? 4
                 : page_chunks % 64 == 0  ? 2
                                          : 1;
  const int folded_weights_bytes = page_chunks * int(64 / element);
  // One stage of every warp of a thread block: a pass of one page per warp.
  const int folded_stage_bytes = jb * 32 * 16 * (kScoreThreads / 32);
  const bool page_major =
      (p.group_reduce == GroupReduce::Sum || group == 1) && meta_rows_aligned(16) &&
      (head_chunks == 16 || head_chunks == 32 || head_chunks == 64) && page_chunks % 32 == 0 &&
      folded_weights_bytes + 2 * folded_stage_bytes <= smem_optin &&
      // a lane's offset within a block's summary is an int
      p.page_meta.stride_head + p.page_meta.stride_row + p.head_dim <=
          std::numeric_limits<int>::max();
  if (page_major) {
    a.score_stages = folded_weights_bytes + kMaxFoldedStages * folded_stage_bytes <= smem_optin
                         ? kMaxFoldedStages
                         : 2;
    score.smem_bytes = folded_weights_bytes + a.score_stages * folded_stage_bytes;
    score.kernel = dispatch_float_dtype(p.dtype, op, [&](auto type) {
      using Q = typename decltype(type)::type;
      auto typed = [&](auto meta_type) {
        using MT = typename decltype(meta_type)::type;
        auto pick = [&](auto j) {
          constexpr int JB = decltype(j)::value;
          if constexpr (JB == 1) {  // a KV head of 64 chunks is two chunks a lane at least
            return head_chunks == 16
                       ? reinterpret_cast<const void*>(score_pages_folded_kernel<Q, MT, 1, 4, 1>)
                       : reinterpret_cast<const void*>(score_pages_folded_kernel<Q, MT, 1, 5, 1>);
          } else {
            return head_chunks == 16
                       ? reinterpret_cast<const void*>(score_pages_folded_kernel<Q, MT, JB, 4, 1>)
                   : head_chunks == 32
                       ? reinterpret_cast<const void*>(score_pages_folded_kernel<Q, MT, JB, 5, 1>)
                       : reinterpret_cast<const void*>(score_pages_folded_kernel<Q, MT, JB, 5, 2>);
          }
        };
        return jb == 1   ? pick(IntTag<1>{})
               : jb == 2 ? pick(IntTag<2>{})
               : jb == 4 ? pick(IntTag<4>{})
                         : pick(IntTag<8>{});
      };
      return p.page_meta.fp8 ? typed(TypeTag<__nv_fp8_e4m3>{}) : typed(TypeTag<Q>{});
    });
  } else if (wide) {
    while (a.lanes_per_head > 1 && a.lanes_per_head / 2 >= chunks) a.lanes_per_head /= 2;
    a.score_stages = wide_stages;
    const ScoreMode mode = folded                                   ? ScoreMode::Folded
                           : p.summary == PageSummary::MinMax       ? ScoreMode::PerHeadMinMax
                           : p.summary == PageSummary::MinMaxDamped ? ScoreMode::PerHeadMinMaxDamped
                                                                    : ScoreMode::PerHeadMeanStd;
    score.smem_bytes = weights_bytes + a.score_stages * kScoreStageBlockBytes;
    score.kernel = dispatch_float_dtype(p.dtype, op, [&](auto type) {
      using Q = typename decltype(type)::type;
      auto typed = [&](auto meta_type) {
        using MT = typename decltype(meta_type)::type;
        auto pick = [&](auto k) {
          constexpr int K = decltype(k)::value;
          switch (mode) {
            case ScoreMode::Folded:
              return reinterpret_cast<const void*>(
                  score_pages_wide_kernel<Q, MT, K, ScoreMode::Folded>);
            case ScoreMode::PerHeadMinMax:
              return reinterpret_cast<const void*>(
                  score_pages_wide_kernel<Q, MT, K, ScoreMode::PerHeadMinMax>);
            case ScoreMode::PerHeadMinMaxDamped:
              return reinterpret_cast<const void*>(
                  score_pages_wide_kernel<Q, MT, K, ScoreMode::PerHeadMinMaxDamped>);
            default:
              return reinterpret_cast<const void*>(
                  score_pages_wide_kernel<Q, MT, K, ScoreMode::PerHeadMeanStd>);
          }
        };
        return chunks > 32 ? pick(IntTag<2>{}) : pick(IntTag<1>{});
      };
      return p.page_meta.fp8 ? typed(TypeTag<__nv_fp8_e4m3>{}) : typed(TypeTag<Q>{});
    });
  } else {
    // Vector loads of 4 elements where every row start is aligned for them.
    const bool vec = meta_rows_aligned(4 * element);
    score.smem_bytes = int(std::size_t(p.num_q_heads) * p.head_dim * sizeof(float));
    score.kernel = dispatch_float_dtype(p.dtype, op, [&](auto type) {
      using Q = typename decltype(type)::type;
      if (p.page_meta.fp8) {
        return vec ? reinterpret_cast<const void*>(score_pages_kernel<Q, __nv_fp8_e4m3, 4>)
                   : reinterpret_cast<const void*>(score_pages_kernel<Q, __nv_fp8_e4m3, 1>);
      }
      return vec ? reinterpret_cast<const void*>(score_pages_kernel<Q, Q, 4>)
                 : reinterpret_cast<const void*>(score_pages_kernel<Q, Q, 1>);
    });
  }
  // The core caps num_q_heads * head_dim at 32768: the page-wide kernel's weights or queries take
  // at most 128 KiB (it folds only groups of two or more), plus its staging; the page-major
  // kernel's weights up to 256 KiB (one query head per KV head), plus its stages. The limit is
  // raised once per kernel, to what any call may need that the device allows (a call that needs
  // more takes another kernel: the host checks each one's shared memory).
  score.max_smem_bytes =
      page_major
          ? smem_optin
          : std::min(32768 * 4 + (wide ? kMaxScoreStages * kScoreStageBlockBytes : 0), smem_optin);
  // Enough thread blocks to fill the device once, each a run of pages of one sequence for all
  // KV heads (a run of at least one page per warp).
  const int resident = info.multiprocessors * prepare_launch(score, p.device_index, op);
  const int blocks_per_seq = std::max(1, resident / std::max(1, p.batch));
  a.pages_per_block =
      std::max(kScoreThreads / 32, (p.max_blocks + blocks_per_seq - 1) / blocks_per_seq);
  const int score_grid = std::max(1, (p.max_blocks + a.pages_per_block - 1) / a.pages_per_block);
  // Both kernels are launched with programmatic dependent launch on sm_90: the scoring kernel's
  // launch overlaps the previous kernel's end, the top-k's the scoring kernel's; each waits on the
  // device for the grid before it.
  const bool overlap = info.overlaps_launches();
  launch_after(score.kernel, dim3(unsigned(score_grid), unsigned(p.batch)), dim3(kScoreThreads),
               std::size_t(score.smem_bytes), s, a, overlap, op, "score_pages_kernel");

  const int topk_smem_limit =
      std::min(int(topk_smem_bytes(kTopKMaxPages)), smem_optin - kTopKStaticSmemBytes);
  if (p.max_blocks <= kTopKMaxPages && int(topk_smem_bytes(p.max_blocks)) <= topk_smem_limit) {
    DecodeLaunch topk{};
    topk.kernel = reinterpret_cast<const void*>(select_pages_kernel);
    topk.smem_bytes = int(topk_smem_bytes(p.max_blocks));
    topk.max_smem_bytes = topk_smem_limit;
    topk.threads = kTopKThreads;
    prepare_launch(topk, p.device_index, op);
    launch_after(topk.kernel, select_grid, dim3(kTopKThreads), std::size_t(topk.smem_bytes), s, a,
                 overlap, op, "select_pages_kernel");
  } else {
    launch_after(reinterpret_cast<const void*>(select_pages_global_kernel), select_grid,
                 dim3(kSelectThreads), 0, s, a, overlap, op, "select_pages_kernel");
  }
}

}  // namespace tinyserve::kernels::cuda
