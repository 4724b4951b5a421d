// CUDA page summaries and page selection.
//
// Summaries written with the cache: one thread block per token of the call; the block of the
// first token (in slot_mapping order) that writes a page owns that page for the call, gathers
// every token of the call on the page, and rewrites the page's summary alone. No two blocks
// write one page, so no atomics are needed and the result does not depend on scheduling.
//
// Selection: a scoring kernel spread over (sequence, page range) writes one float score per
// (sequence, KV head, page) into the caller's scratch; a selection kernel, one thread block per
// (sequence, KV head), finds the k-th largest score by radix select (four 8-bit passes), keeps
// the pages above it and the lowest-indexed pages equal to it, and writes them in logical order
// with two block scans. Grids depend only on host-known shapes: graph capturable, no host sync.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "core/kernels.h"
#include "cuda/common.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/page_meta.cuh"

namespace tinyserve::kernels::cuda {
namespace {

// Elements (head, dim) of one page that a thread folds per tile.
constexpr int kPerThread = 4;

// One thread's share of a page summary while it is built, over a tile of elements.
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

template <class T>
__device__ __forceinline__ void acc_fold(Accumulator& acc, int i, PageSummary kind, T key) {
  const float x = to_float(key);
  if (kind == PageSummary::MinMax) {
    acc.a[i] = fminf(acc.a[i], x);
    acc.b[i] = fmaxf(acc.b[i], x);
  } else {
    acc.a[i] += x;
    acc.b[i] = fmaf(x, x, acc.b[i]);
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
    acc.a[i] = float(n) * x;
    acc.b[i] = float(n) * fmaf(y, y, x * x);
  }
}

template <class T>
__device__ __forceinline__ void acc_store(const Accumulator& acc, int i, PageSummary kind, T* r0,
                                          T* r1) {
  if (kind == PageSummary::MinMax) {
    *r0 = from_float<T>(acc.a[i]);
    *r1 = from_float<T>(acc.b[i]);
  } else {
    const float n = float(max(acc.count, 1));
    const float mean = acc.a[i] / n;
    const float var = fmaxf(0.0f, acc.b[i] / n - mean * mean);
    *r0 = from_float<T>(mean);
    *r1 = from_float<T>(sqrtf(var));
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
};

template <class T>
__global__ void update_page_meta_kernel(const __grid_constant__ UpdateArgs a) {
  __shared__ int scratch[33];
  __shared__ int members[1024];
  __shared__ int lowest;
  const T* key = reinterpret_cast<const T*>(a.key);
  T* meta = reinterpret_cast<T*>(a.meta);
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
          const T* r = meta + page * a.meta_stride_block + h * a.meta_stride_head + d;
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
            acc_fold(acc, i, a.kind, key[t * a.key_stride_token + h * a.key_stride_head + d]);
          }
        }
        acc.count += found;
        __syncthreads();
      }
      for (int i = 0; i < kPerThread; ++i) {
        const int e = first + i * blockDim.x + threadIdx.x;
        if (e >= elements) break;
        const int h = e / a.head_dim, d = e - h * a.head_dim;
        T* r = meta + page * a.meta_stride_block + h * a.meta_stride_head + d;
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
};

template <class T>
__global__ void build_page_meta_kernel(const __grid_constant__ BuildArgs a) {
  const int b = blockIdx.y;
  const std::int64_t len = a.seq_lens[b];
  const std::int64_t page = blockIdx.x;
  if (page * a.block_size >= len) return;
  const std::int64_t block = a.block_table[b * a.block_table_stride + page];
  if (block < 0 || block >= a.num_blocks) return;  // never out of bounds
  const int tokens = int(min(std::int64_t(a.block_size), len - page * a.block_size));
  const T* kc = reinterpret_cast<const T*>(a.key_cache) + block * a.kc_stride_block;
  T* meta = reinterpret_cast<T*>(a.meta) + block * a.meta_stride_block;
  const int elements = a.num_heads * a.head_dim;
  for (int first = 0; first < elements; first += kPerThread * blockDim.x) {
    Accumulator acc;
    acc_reset(acc, a.kind);
    for (int t = 0; t < tokens; ++t) {
      for (int i = 0; i < kPerThread; ++i) {
        const int e = first + i * blockDim.x + threadIdx.x;
        if (e >= elements) break;
        const int h = e / a.head_dim, d = e - h * a.head_dim;
        acc_fold(acc, i, a.kind, kc[t * a.kc_stride_token + h * a.kc_stride_head + d]);
      }
    }
    acc.count = tokens;
    for (int i = 0; i < kPerThread; ++i) {
      const int e = first + i * blockDim.x + threadIdx.x;
      if (e >= elements) break;
      const int h = e / a.head_dim, d = e - h * a.head_dim;
      T* r = meta + h * a.meta_stride_head + d;
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

// VEC consecutive elements of a summary row as floats, in one load when VEC > 1 (the caller
// checked the alignment).
template <class T, int VEC>
__device__ __forceinline__ void load_row(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
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
// one warp per (page, KV head), each lane VEC consecutive elements of head_dim at a time (both
// summary rows loaded before any arithmetic, so a warp has its loads in flight together), the
// queries in shared memory.
template <class T, int VEC>
__global__ void __launch_bounds__(kScoreThreads)
    score_pages_kernel(const __grid_constant__ SelectArgs a) {
  extern __shared__ float q[];  // [num_q_heads, head_dim]
  const int b = blockIdx.y;
  const std::int64_t len = clamped_length(a, b);
  const int pages = int((len + a.block_size - 1) / a.block_size);
  if (pages <= a.budget) return;  // the selection kernel copies the table
  const int begin = max(int(blockIdx.x) * a.pages_per_block, a.num_sink_pages);
  const int end = min(int(blockIdx.x + 1) * a.pages_per_block, pages - 1);
  if (begin >= end) return;
  const T* query = reinterpret_cast<const T*>(a.query) + b * a.q_stride_batch;
  for (int i = threadIdx.x; i < a.num_q_heads * a.head_dim; i += blockDim.x) {
    const int h = i / a.head_dim, d = i - h * a.head_dim;
    q[i] = to_float(query[h * a.q_stride_head + d]);
  }
  __syncthreads();
  const int group = a.num_q_heads / a.num_kv_heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const T* meta = reinterpret_cast<const T*>(a.meta);
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  const int items = (end - begin) * a.num_kv_heads;
  for (int item = warp; item < items; item += warps) {
    const int page = begin + item / a.num_kv_heads, kvh = item % a.num_kv_heads;
    const std::int64_t block = table[page];
    float combined = -INFINITY;
    if (block >= 0 && block < a.num_blocks) {
      const T* r0 = meta + block * a.meta_stride_block + kvh * a.meta_stride_head;
      const T* r1 = r0 + a.meta_stride_row;
      const float* q0 = q + kvh * group * a.head_dim;
      if (a.head_dim <= 32 * VEC) {
        // One piece of head_dim per lane: load it once, score every query head of the group.
        const int d = lane * VEC;
        float lo[VEC] = {}, hi[VEC] = {};
        if (d < a.head_dim) {
          load_row<T, VEC>(r0 + d, lo);
          load_row<T, VEC>(r1 + d, hi);
        }
        for (int g = 0; g < group; ++g) {
          float s = d < a.head_dim ? page_term<VEC>(a.kind, q0 + g * a.head_dim + d, lo, hi) : 0.0f;
          for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          combined = g == 0 ? s : a.reduce == GroupReduce::Sum ? combined + s : fmaxf(combined, s);
        }
      } else {
        for (int g = 0; g < group; ++g) {
          float s = 0.0f;
          for (int d = lane * VEC; d < a.head_dim; d += 32 * VEC) {
            float lo[VEC], hi[VEC];
            load_row<T, VEC>(r0 + d, lo);
            load_row<T, VEC>(r1 + d, hi);
            s += page_term<VEC>(a.kind, q0 + g * a.head_dim + d, lo, hi);
          }
          for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
          combined = g == 0 ? s : a.reduce == GroupReduce::Sum ? combined + s : fmaxf(combined, s);
        }
      }
      if (isnan(combined)) combined = -INFINITY;
    }
    if (lane == 0) {
      a.scores[(std::int64_t(b) * a.num_kv_heads + kvh) * a.max_blocks + page] = combined;
    }
  }
}

// A float's bits as an unsigned key with the same order (larger float, larger key).
__device__ __forceinline__ std::uint32_t order_key(float f) {
  const std::uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int kSelectThreads = 512;

__global__ void __launch_bounds__(kSelectThreads)
    select_pages_kernel(const __grid_constant__ SelectArgs a) {
  __shared__ int scratch[33];
  __shared__ int histogram[256];
  __shared__ std::uint32_t prefix_shared;
  __shared__ int remaining_shared;
  const int kvh = blockIdx.x, b = blockIdx.y;
  const std::int64_t len = clamped_length(a, b);
  const int pages = int((len + a.block_size - 1) / a.block_size);
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  std::int32_t* out = a.out_table + b * a.out_table_stride_batch + kvh * a.out_table_stride_head;
  if (pages <= a.budget) {
    for (int i = threadIdx.x; i < a.budget; i += blockDim.x) {
      const std::int32_t id = i < pages ? table[i] : -1;
      out[i] = id;
      if (a.hits && id >= 0 && id < a.num_blocks) atomicAdd(&a.hits[id], 1);
    }
    if (threadIdx.x == 0) {
      a.out_lens[b * a.out_lens_stride_batch + kvh * a.out_lens_stride_head] = std::int32_t(len);
    }
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
      // Scores of one page range tend to share their top bits: lanes of a warp that hit one
      // bin add together (one atomic per bin and warp, not one per lane).
      for (int base = first; base < last; base += blockDim.x) {
        const int p = base + threadIdx.x;
        const std::uint32_t k = p < last ? order_key(scores[p]) : 0u;
        const bool counted = p < last && (k & mask) == prefix;
        const std::uint32_t bin = counted ? (k >> shift) & 255u : 256u;
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (counted && (threadIdx.x & 31) == __ffs(peers) - 1) {
          atomicAdd(&histogram[bin], __popc(peers));
        }
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
    if (kept) {
      const std::int32_t id = table[p];
      out[at] = id;
      if (a.hits && id >= 0 && id < a.num_blocks) atomicAdd(&a.hits[id], 1);
    }
  }
  if (threadIdx.x == 0) {
    a.out_lens[b * a.out_lens_stride_batch + kvh * a.out_lens_stride_head] = std::int32_t(
        std::int64_t(a.budget - 1) * a.block_size + len - std::int64_t(last) * a.block_size);
  }
}

template <class F>
const void* by_dtype(DType dtype, F f) {
  switch (dtype) {
    case DType::Float16:
      return f(__half{});
    case DType::BFloat16:
      return f(__nv_bfloat16{});
    default:
      return f(float{});
  }
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
  const int elements = p.num_heads * p.head_dim;
  const int threads = std::min(1024, std::max(64, (elements / kPerThread + 31) / 32 * 32));
  const unsigned grid = unsigned(std::min<std::int64_t>(p.num_tokens, 1 << 30));
  const void* kernel = by_dtype(p.dtype, [](auto t) {
    return reinterpret_cast<const void*>(update_page_meta_kernel<decltype(t)>);
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
  const int elements = p.num_heads * p.head_dim;
  const int threads = std::min(1024, std::max(64, (elements / kPerThread + 31) / 32 * 32));
  const void* kernel = by_dtype(p.dtype, [](auto t) {
    return reinterpret_cast<const void*>(build_page_meta_kernel<decltype(t)>);
  });
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
  cudaStream_t s = as_stream(stream);
  // Scoring: enough thread blocks to fill the device, each a run of pages for all KV heads.
  const int sms = device_info(p.device_index).multiprocessors;
  const int want_blocks = std::max(1, 4 * sms / std::max(1, p.batch));
  a.pages_per_block = std::max(8, (p.max_blocks + want_blocks - 1) / want_blocks);
  const int score_grid = (p.max_blocks + a.pages_per_block - 1) / a.pages_per_block;
  const std::size_t smem = std::size_t(p.num_q_heads) * p.head_dim * sizeof(float);
  // Vector loads of 4 elements where every row start is aligned for them.
  const std::uint64_t align = 4 * dtype_size(p.dtype);
  const auto aligned = [&](std::int64_t elements) {
    return (std::uint64_t(elements) * dtype_size(p.dtype)) % align == 0;
  };
  const bool vec = reinterpret_cast<std::uintptr_t>(p.page_meta.data) % align == 0 &&
                   aligned(p.head_dim) && aligned(p.page_meta.stride_block) &&
                   aligned(p.page_meta.stride_head) && aligned(p.page_meta.stride_row);
  const void* score = by_dtype(p.dtype, [vec](auto t) {
    using T = decltype(t);
    return vec ? reinterpret_cast<const void*>(score_pages_kernel<T, 4>)
               : reinterpret_cast<const void*>(score_pages_kernel<T, 1>);
  });
  if (smem > 48 * 1024) {
    check(cudaFuncSetAttribute(score, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), op,
          "cudaFuncSetAttribute");
  }
  launch(score, dim3(unsigned(score_grid), unsigned(p.batch)), dim3(kScoreThreads), smem, s, a, op,
         "score_pages_kernel");
  launch(reinterpret_cast<const void*>(select_pages_kernel),
         dim3(unsigned(p.num_kv_heads), unsigned(p.batch)), dim3(kSelectThreads), 0, s, a, op,
         "select_pages_kernel");
}

}  // namespace tinyserve::kernels::cuda
