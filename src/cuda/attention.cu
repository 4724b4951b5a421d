// CUDA paged decode attention.
//
// Work: one thread block (CTA) per (sequence, split, KV head, tile of up to 16 query heads of
// its GQA group), so all query heads of a group share every K/V tile. Long sequences are split
// into num_splits chunks (flash-decoding): each CTA writes a float32 partial output and its
// log-sum-exp to the caller's workspace, and a second kernel merges them. The split count comes
// from host-side values only (plan_attention_splits); each CTA derives its token range from the
// sequence length it reads on the device, so a captured CUDA graph stays correct when lengths
// and tables change between replays.
//
// Two kernels:
// - decode_mma_kernel (float16/bfloat16, head_dim 64/128/256, 16-byte aligned rows): 4 warps,
//   each owns 16 tokens of a 64-token tile. K and V tiles stream through a 3-stage (split
//   launches at head_dim 128: 2-stage, three CTAs per multiprocessor) cp.async
//   pipeline (rows past the range are zero-filled, never read); Q.K^T and P.V run on tensor
//   cores (m16n8k16, float32 accumulation; the query heads are the M dimension). Online softmax
//   in float32, log2 domain. Warps merge their states through shared memory at the end.
// - decode_generic_kernel (any dtype incl. float32, head_dim <= 512, any alignment): CUDA
//   cores, a warp per token, up to 8 query heads per CTA.
//
// Block ids read from the device are bounds-checked: an id outside the cache reads nothing
// (its rows are zeros), so a bad table can never read outside the cache.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/kernels.h"
#include "cuda/common.cuh"
#include "cuda/dtypes.cuh"
#include "cuda/ptx.cuh"

// Diagnostics for benchmark variants only (each makes the output wrong): leave out the K/V
// copies, the per-tile arithmetic, or the split merge, to time the rest.
#ifndef TS_DIAG_NO_LOADS
#define TS_DIAG_NO_LOADS 0
#endif
#ifndef TS_DIAG_NO_COMPUTE
#define TS_DIAG_NO_COMPUTE 0
#endif
#ifndef TS_DIAG_NO_MERGE
#define TS_DIAG_NO_MERGE 0
#endif
// Timeline: every CTA of the tensor-core and merge kernels records globaltimer stamps into
// ts_diag_timeline / ts_diag_merge_timeline (benchmarks/timeline.cu reads them). Off by default.
#ifndef TS_DIAG_TIMELINE
#define TS_DIAG_TIMELINE 0
#endif
// Pipeline stages of the head_dim-128 tensor-core kernel when the sequences are split (two: three
// CTAs fit on a multiprocessor). Unsplit launches and other head dims use three (two CTAs).
#ifndef TS_SPLIT_STAGES_D128
#define TS_SPLIT_STAGES_D128 2
#endif

#if TS_DIAG_TIMELINE
constexpr int kDiagMaxCtas = 1 << 16;
// Per decode CTA: start, first tile landed, loop done, end (ns), SM id. Per merge CTA: start,
// after the wait for the decode kernel, end, thread 0's loads merged, groups met.
__device__ unsigned long long ts_diag_timeline[kDiagMaxCtas][5];
__device__ unsigned long long ts_diag_merge_timeline[kDiagMaxCtas][5];
__device__ __forceinline__ unsigned long long ts_diag_now() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ unsigned ts_diag_cta() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
#define TS_DIAG_MARK(table, event)                                                      \
  do {                                                                                  \
    if (threadIdx.x == 0 && ts_diag_cta() < kDiagMaxCtas) {                             \
      table[ts_diag_cta()][event] = ts_diag_now();                                      \
    }                                                                                   \
  } while (0)
#else
#define TS_DIAG_MARK(table, event) \
  do {                             \
  } while (0)
#endif

namespace tinyserve::kernels::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;             // tokens per pipeline stage (MMA kernel)
constexpr int kMmaHeads = 16;         // query heads per CTA (MMA kernel: the M of m16n8k16)
constexpr int kGenericHeads = 8;      // query heads per CTA (generic kernel)
constexpr int kGenericMaxDim = 512;   // 16 elements per lane
constexpr int kMinSplitTokens = 256;  // no split makes chunks shorter than this
constexpr double kSplitOverheadTokens = 128.0;  // per-CTA fixed cost, in tokens of streaming

struct AttnArgs {
  const void* query;
  std::int64_t q_stride_batch, q_stride_head;
  const void* k_cache;
  const void* v_cache;
  std::int64_t k_stride_block, k_stride_token, k_stride_head;
  std::int64_t v_stride_block, v_stride_token, v_stride_head;
  const std::int32_t* block_table;
  std::int64_t block_table_stride;
  const std::int32_t* seq_lens;
  void* out;
  std::int64_t out_stride_batch, out_stride_head;
  float* lse;
  std::int64_t lse_stride_batch, lse_stride_head;
  float* part_out;  // [num_splits, batch, num_q_heads, head_dim], when num_splits > 1
  float* part_lse;  // [num_splits, batch, num_q_heads], log2 domain
  std::int64_t num_blocks;
  int max_blocks;
  int batch, num_q_heads, head_dim, block_size;
  int block_shift;  // log2(block_size) when it is a power of two, else -1
  int group;        // query heads per KV head
  int head_tiles;   // CTAs per KV head along the group
  int window_left;
  int num_splits;
  // logit (log2 domain) = post * tanh(q.k * pre) with a soft cap, else q.k * pre
  float pre, post;
  bool soft_cap;
};

// The token range [begin, end) of split `split` of sequence b. Chunks are whole multiples of
// `align` tokens so that only a sequence's last chunk has a partial tile.
__device__ __forceinline__ void split_range(const AttnArgs& a, int b, int split, int align,
                                            int& begin, int& end) {
  const int capacity = a.max_blocks * a.block_size;  // fits int32: checked on the host
  const int len = min(max(a.seq_lens[b], 0), capacity);
  const int first = a.window_left >= 0 ? max(0, len - 1 - a.window_left) : 0;
  const int n = len - first;
  int chunk = (n + a.num_splits - 1) / a.num_splits;
  chunk = (chunk + align - 1) / align * align;
  begin = min(len, first + split * chunk);
  end = min(len, begin + chunk);
}

// token / block_size (the page) and token % block_size (the slot in it).
__device__ __forceinline__ int page_of(const AttnArgs& a, int token) {
  return a.block_shift >= 0 ? token >> a.block_shift
                            : int(unsigned(token) / unsigned(a.block_size));
}

// What one CTA computes: query heads [head0, head0 + heads) of KV head kv_head, over tokens
// [begin, end) of sequence b (split `split`), from its position in the grid
// (kv_heads x head_tiles, splits, batch).
struct WorkUnit {
  int b, split, kv_head, head0, heads, begin, end;
};

__device__ __forceinline__ WorkUnit work_unit(const AttnArgs& a, int heads_per_cta, int align) {
  WorkUnit u;
  u.b = blockIdx.z;
  u.split = blockIdx.y;
  u.kv_head = blockIdx.x / a.head_tiles;
  u.head0 = u.kv_head * a.group + (blockIdx.x % a.head_tiles) * heads_per_cta;
  u.heads = min(heads_per_cta, u.kv_head * a.group + a.group - u.head0);
  split_range(a, u.b, u.split, align, u.begin, u.end);
  return u;
}

__device__ __forceinline__ float logit(const AttnArgs& a, float qk) {
  return a.soft_cap ? a.post * tanhf(qk * a.pre) : qk * a.pre;
}

// Writes one output element of query head h; `value` is normalised, `lse2` in log2 domain.
template <class T>
__device__ __forceinline__ void store_output(const AttnArgs& a, int b, int split, int h, int d,
                                             float value, float lse2) {
  if (a.num_splits == 1) {
    T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + h * a.out_stride_head;
    out[d] = from_float<T>(value);
    if (d == 0 && a.lse) {
      a.lse[b * a.lse_stride_batch + h * a.lse_stride_head] =
          lse2 == -INFINITY ? -INFINITY : lse2 * kLn2;
    }
  } else {
    const std::int64_t row = (std::int64_t(split) * a.batch + b) * a.num_q_heads + h;
    a.part_out[row * a.head_dim + d] = value;
    if (d == 0) a.part_lse[row] = lse2;
  }
}

// Final merge of per-warp softmax states kept in shared memory: red_m/red_l [kWarps][rows],
// red_o [kWarps][rows][o_stride] (dim used). Writes rows [0, heads) of query heads head0...
template <class T>
__device__ void merge_warps_and_store(const AttnArgs& a, const float* red_m, const float* red_l,
                                      const float* red_o, int rows, int dim, int o_stride,
                                      int heads, int head0, int b, int split) {
  for (int i = threadIdx.x; i < heads * dim; i += kThreads) {
    const int r = i / dim, d = i - r * dim;
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, red_m[w * rows + r]);
    float value = 0.0f, lse2 = -INFINITY;
    if (m != -INFINITY) {
      float l = 0.0f, acc = 0.0f;
      for (int w = 0; w < kWarps; ++w) {
        const float scale = ptx::exp2_approx(red_m[w * rows + r] - m);
        l += red_l[w * rows + r] * scale;
        acc += red_o[(w * rows + r) * o_stride + d] * scale;
      }
      value = acc / l;
      lse2 = m + log2f(l);
    }
    store_output<T>(a, b, split, head0 + r, d, value, lse2);
  }
}

// ---------------------------------------------------------------------------------------------
// Tensor-core kernel

template <int D, int Stages>
struct MmaConfig {
  static constexpr int kRow = D + 8;  // shared row stride (elements): 16-byte pad, no conflicts
  static constexpr int kStages = Stages;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kChunks;
  static constexpr int kPasses = kTile / kRowsPerPass;
  static constexpr bool kQInRegisters = D <= 128;
  static constexpr int kQBytes = kMmaHeads * kRow * 2;
  static constexpr int kStageBytes = 2 * kTile * kRow * 2;
  static constexpr int kRowAddressBytes = kStages * 2 * kTile * 8;  // per stage: K, V row addresses
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + kRowAddressBytes;
  // Reduction rows of float32 outputs: stride D + 8 makes the quads' 8-byte stores conflict-free.
  static constexpr int kRedRow = D + 8;
  static constexpr int kReduceBytes = kWarps * kMmaHeads * (kRedRow + 2) * 4;
  static_assert(kReduceBytes <= kStages * kStageBytes, "reduction must fit the stage buffers");
  static_assert(kThreads % kChunks == 0 && kTile % kRowsPerPass == 0, "loader shape");
  static_assert(kTile <= kThreads, "one thread computes each row's offsets");
};

// The running max of a row is raised only when a score exceeds it by this much (log2 units):
// probabilities then stay below 2^8 (exact enough in float32, representable in float16 and
// bfloat16), and most tiles skip rescaling the accumulators.
constexpr float kRescaleThreshold = 8.0f;

template <class T, int D, int Stages>
__global__ void __launch_bounds__(kThreads) decode_mma_kernel(const __grid_constant__ AttnArgs a) {
  using C = MmaConfig<D, Stages>;
  constexpr std::uint32_t kRowBytes = C::kRow * 2;
  TS_DIAG_MARK(ts_diag_timeline, 0);
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_smem = reinterpret_cast<T*>(smem);
  const std::uint32_t stages = ptx::smem_addr(smem + C::kQBytes);
  // [stage][K, V][row]: the global address of each row of the tile; bit 0 set = no row (past
  // the range, or a block id outside the cache).
  std::uint64_t* rows =
      reinterpret_cast<std::uint64_t*>(smem + C::kQBytes + C::kStages * C::kStageBytes);

  const WorkUnit u = work_unit(a, kMmaHeads, kTile);
  const int b = u.b, split = u.split, kv_head = u.kv_head, head0 = u.head0, heads = u.heads;
  const int begin = u.begin, end = u.end;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int num_tiles = (end - begin + kTile - 1) / kTile;

  // Row addresses: thread t < kTile owns row t of every tile. It reads the block id of its row
  // two tiles ahead (into a register) and writes the row's K and V addresses one tile ahead of
  // the copies that use them, so neither the table read nor the address arithmetic is on the
  // copies' path.
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  const bool row_owner = threadIdx.x < kTile;
  const T* k_head = static_cast<const T*>(a.k_cache) + kv_head * a.k_stride_head;
  const T* v_head = static_cast<const T*>(a.v_cache) + kv_head * a.v_stride_head;
  auto lookup = [&](int tile) -> int {
    const int token = begin + tile * kTile + int(threadIdx.x);
    return tile < num_tiles && token < end ? table[page_of(a, token)] : -1;
  };
  auto store_rows = [&](int tile, std::int64_t block) {
    const int token = begin + tile * kTile + int(threadIdx.x);
    std::uint64_t k_row = reinterpret_cast<std::uint64_t>(k_head) | 1u;
    std::uint64_t v_row = reinterpret_cast<std::uint64_t>(v_head) | 1u;
    if (block >= 0 && block < a.num_blocks) {
      const std::int64_t in_page = token - page_of(a, token) * a.block_size;
      k_row = reinterpret_cast<std::uint64_t>(k_head + block * a.k_stride_block +
                                              in_page * a.k_stride_token);
      v_row = reinterpret_cast<std::uint64_t>(v_head + block * a.v_stride_block +
                                              in_page * a.v_stride_token);
    }
    std::uint64_t* slot = rows + (tile % C::kStages) * 2 * kTile;
    slot[threadIdx.x] = k_row;
    slot[kTile + threadIdx.x] = v_row;
  };

  // Copies: thread t moves 16-byte chunk t % kChunks of rows t / kChunks + kRowsPerPass * i.
  const std::uint32_t chunk_bytes = (threadIdx.x % C::kChunks) * 16;
  const int row0 = threadIdx.x / C::kChunks;
  auto load_tile = [&](int tile) {
#if TS_DIAG_NO_LOADS
    return;
#endif
    const int stage = tile % C::kStages;
    const std::uint32_t ks = stages + stage * C::kStageBytes + row0 * kRowBytes + chunk_bytes;
    const std::uint32_t vs = ks + kTile * kRowBytes;
    const std::uint64_t* k_rows = rows + stage * 2 * kTile + row0;
    const std::uint64_t* v_rows = k_rows + kTile;
#pragma unroll
    for (int pass = 0; pass < C::kPasses; ++pass) {
      const std::uint64_t kr = k_rows[pass * C::kRowsPerPass];
      const std::uint64_t vr = v_rows[pass * C::kRowsPerPass];
      const std::uint32_t dst = pass * C::kRowsPerPass * kRowBytes;
      ptx::cp_async_16(
          ks + dst, reinterpret_cast<const char*>(kr & ~std::uint64_t(1)) + chunk_bytes, kr & 1u);
      ptx::cp_async_16(
          vs + dst, reinterpret_cast<const char*>(vr & ~std::uint64_t(1)) + chunk_bytes, vr & 1u);
    }
  };

  // The first block ids are read before Q is copied, so the two reads' latencies overlap.
  int first_blocks[C::kStages];
  int next_block = -1;
  if (row_owner) {
#pragma unroll
    for (int t = 0; t < C::kStages; ++t) first_blocks[t] = lookup(t);
    next_block = lookup(C::kStages);
  }
  // Q: [16 heads][D] in shared memory, rows past the group zero.
  {
    const T* q = static_cast<const T*>(a.query) + b * a.q_stride_batch;
    for (int i = threadIdx.x; i < kMmaHeads * C::kChunks; i += kThreads) {
      const int r = i / C::kChunks, c = i % C::kChunks;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (r < heads) v = *reinterpret_cast<const uint4*>(q + (head0 + r) * a.q_stride_head + c * 8);
      *reinterpret_cast<uint4*>(q_smem + r * C::kRow + c * 8) = v;
    }
  }
  if (row_owner) {
#pragma unroll
    for (int t = 0; t < C::kStages; ++t) store_rows(t, first_blocks[t]);
  }
  __syncthreads();
  // Every stage is free at the start: fill them all. From then on each iteration refills the
  // stage its predecessor consumed, kStages - 1 tiles ahead of the one it computes.
#pragma unroll
  for (int t = 0; t < C::kStages; ++t) {
    if (t < num_tiles) load_tile(t);
    ptx::cp_async_commit();
  }

  // Fragment addresses (shared, bytes). Q (A operand): matrix l / 8 holds rows
  // (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8 of each 16-wide step. K (B operand of S):
  // tokens warp * 16 + (l / 16) * 8 + l % 8, columns (l / 8 % 2) * 8. V (B operand of O,
  // transposed): tokens warp * 16 + (l / 8 % 2) * 8 + l % 8, columns (l / 16) * 8.
  const std::uint32_t q_frag =
      ptx::smem_addr(q_smem) + ((lane % 8) + ((lane / 8) % 2) * 8) * kRowBytes + (lane / 16) * 16;
  const std::uint32_t k_frag =
      stages + (warp * 16 + (lane / 16) * 8 + lane % 8) * kRowBytes + ((lane / 8) % 2) * 16;
  const std::uint32_t v_frag = stages + kTile * kRowBytes +
                               (warp * 16 + ((lane / 8) % 2) * 8 + lane % 8) * kRowBytes +
                               (lane / 16) * 16;
  std::uint32_t q_regs[C::kQInRegisters ? D / 16 : 1][4];
  if constexpr (C::kQInRegisters) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4(q_regs[kk], q_frag + kk * 32);
  }

  // Per thread: rows g = lane / 4 and g + 8 of the 16 heads; columns 2 * (lane % 4) + {0, 1}
  // of each 8-wide block.
  float o[D / 8][4];
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};
  float l[2] = {0.0f, 0.0f};
  const int quad_col = 2 * (lane % 4);

  for (int tile = 0; tile < num_tiles; ++tile) {
    // Copy group k holds tile k: the prologue committed groups 0..kStages-1, iteration t >= 1
    // commits group t + kStages - 1. Tile `tile` has landed once at most kStages - 1 (first
    // iteration) or kStages - 2 (later) younger groups are pending.
    if (tile == 0) {
      ptx::cp_async_wait<C::kStages - 1>();
    } else {
      ptx::cp_async_wait<C::kStages - 2>();
    }
    __syncthreads();
    if (tile == 0) TS_DIAG_MARK(ts_diag_timeline, 1);
    const int next = tile + C::kStages - 1;
    if (tile > 0) {  // tile kStages - 1 was loaded by the prologue
      if (next < num_tiles) load_tile(next);
      ptx::cp_async_commit();
    }
    if (row_owner && next + 1 < num_tiles) {  // rows of tile next + 1 into this tile's slot
      store_rows(next + 1, next_block);
      next_block = lookup(next + 2);
    }
    const std::uint32_t stage_offset = (tile % C::kStages) * C::kStageBytes;
#if TS_DIAG_NO_COMPUTE
    continue;
#endif

    // S = Q K^T for this warp's 16 tokens: two 8-token column blocks, each summed in two
    // independent chains (even and odd steps) to halve the MMA dependency depth.
    float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    float s_odd[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      std::uint32_t kb[4], qa_smem[4];
      ptx::ldmatrix_x4(kb, k_frag + stage_offset + kk * 32);
      const std::uint32_t(&qa)[4] = C::kQInRegisters ? q_regs[C::kQInRegisters ? kk : 0] : qa_smem;
      if constexpr (!C::kQInRegisters) ptx::ldmatrix_x4(qa_smem, q_frag + kk * 32);
      float(&acc)[2][4] = kk % 2 == 0 ? s : s_odd;
      ptx::mma_16816<T>(acc[0], qa, kb[0], kb[1]);
      ptx::mma_16816<T>(acc[1], qa, kb[2], kb[3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] += s_odd[j][e];
    }
    const int t0 = begin + tile * kTile + warp * 16;
    if (begin + (tile + 1) * kTile <= end) {  // a full tile (uniform over the CTA)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = logit(a, s[j][e]);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int token = t0 + j * 8 + quad_col + (e % 2);
          s[j][e] = token < end ? logit(a, s[j][e]) : -INFINITY;
        }
      }
    }
    // Online softmax; a row's 16 scores are spread over the 4 lanes of a quad.
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(fmaxf(s[0][2 * r], s[0][2 * r + 1]), fmaxf(s[1][2 * r], s[1][2 * r + 1]));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    }
    const bool grow = mx[0] > m[0] + kRescaleThreshold || mx[1] > m[1] + kRescaleThreshold;
    if (__any_sync(0xffffffffu, grow)) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (mx[r] > m[r]) {
          const float correction = ptx::exp2_approx(m[r] - mx[r]);  // 0 when m was -inf
          m[r] = mx[r];
          l[r] *= correction;
#pragma unroll
          for (int nb = 0; nb < D / 8; ++nb) {
            o[nb][2 * r] *= correction;
            o[nb][2 * r + 1] *= correction;
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float base = m[r] == -INFINITY ? 0.0f : m[r];  // nothing seen yet: p = 0
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[j][e] = ptx::exp2_approx(s[j][e] - base);
          l[r] += s[j][e];
        }
      }
    }
    // O += P V: P's accumulator layout is the A operand layout of the next MMA.
    const std::uint32_t pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]),
                                 pack2<T>(s[1][0], s[1][1]), pack2<T>(s[1][2], s[1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      std::uint32_t vb[4];
      ptx::ldmatrix_x4_trans(vb, v_frag + stage_offset + dp * 32);
      ptx::mma_16816<T>(o[2 * dp], pa, vb[0], vb[1]);
      ptx::mma_16816<T>(o[2 * dp + 1], pa, vb[2], vb[3]);
    }
  }
  ptx::cp_async_wait<0>();
  ptx::allow_dependent_grids();  // the merge kernel (if any) may start launching
  __syncthreads();               // the stage buffers become the reduction buffers
  TS_DIAG_MARK(ts_diag_timeline, 2);

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  float* red_m = reinterpret_cast<float*>(smem + C::kQBytes);
  float* red_l = red_m + kWarps * kMmaHeads;
  float* red_o = red_l + kWarps * kMmaHeads;
  const int g = lane / 4;
  if (lane % 4 == 0) {
    red_m[warp * kMmaHeads + g] = m[0];
    red_m[warp * kMmaHeads + g + 8] = m[1];
    red_l[warp * kMmaHeads + g] = l[0];
    red_l[warp * kMmaHeads + g + 8] = l[1];
  }
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
    float* row_g = red_o + (warp * kMmaHeads + g) * C::kRedRow + nb * 8 + quad_col;
    *reinterpret_cast<float2*>(row_g) = make_float2(o[nb][0], o[nb][1]);
    *reinterpret_cast<float2*>(row_g + 8 * C::kRedRow) = make_float2(o[nb][2], o[nb][3]);
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, red_o, kMmaHeads, D, C::kRedRow, heads, head0, b,
                           split);
#if TS_DIAG_TIMELINE
  __syncthreads();
  TS_DIAG_MARK(ts_diag_timeline, 3);
  if (threadIdx.x == 0 && ts_diag_cta() < kDiagMaxCtas) {
    unsigned smid;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(smid));
    ts_diag_timeline[ts_diag_cta()][4] = smid;
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// CUDA-core kernel: any dtype, head_dim <= 512, any alignment.

template <class T>
__global__ void __launch_bounds__(kThreads)
    decode_generic_kernel(const __grid_constant__ AttnArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int D = a.head_dim;
  float* q_smem = reinterpret_cast<float*>(smem);   // [kGenericHeads][D]
  float* acc = q_smem + kGenericHeads * D;          // [kWarps][kGenericHeads][D]
  float* red_m = acc + kWarps * kGenericHeads * D;  // [kWarps][kGenericHeads]
  float* red_l = red_m + kWarps * kGenericHeads;

  const WorkUnit u = work_unit(a, kGenericHeads, 1);
  const int b = u.b, split = u.split, kv_head = u.kv_head, head0 = u.head0, heads = u.heads;
  const int begin = u.begin, end = u.end;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  const T* q = static_cast<const T*>(a.query) + b * a.q_stride_batch;
  for (int i = threadIdx.x; i < kGenericHeads * D; i += kThreads) {
    const int r = i / D, d = i - r * D;
    q_smem[i] = r < heads ? to_float(q[(head0 + r) * a.q_stride_head + d]) : 0.0f;
  }
  for (int i = threadIdx.x; i < kWarps * kGenericHeads * D; i += kThreads) acc[i] = 0.0f;
  __syncthreads();

  const T* k_cache = static_cast<const T*>(a.k_cache) + kv_head * a.k_stride_head;
  const T* v_cache = static_cast<const T*>(a.v_cache) + kv_head * a.v_stride_head;
  const std::int32_t* table = a.block_table + b * a.block_table_stride;
  float* my_acc = acc + warp * kGenericHeads * D;
  float m[kGenericHeads], l[kGenericHeads];
#pragma unroll
  for (int g = 0; g < kGenericHeads; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  constexpr int kPerLane = kGenericMaxDim / 32;
  for (int token = begin + warp; token < end; token += kWarps) {
    const int page = page_of(a, token);
    const std::int64_t block = table[page];
    if (block < 0 || block >= a.num_blocks) continue;  // never read outside the cache
    const std::int64_t offset = token - page * a.block_size;
    const T* k = k_cache + block * a.k_stride_block + offset * a.k_stride_token;
    const T* v = v_cache + block * a.v_stride_block + offset * a.v_stride_token;
    float kr[kPerLane], vr[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int d = lane + 32 * i;
      kr[i] = d < D ? to_float(k[d]) : 0.0f;
      vr[i] = d < D ? to_float(v[d]) : 0.0f;
    }
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      if (g >= heads) break;
      float partial = 0.0f;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) partial += q_smem[g * D + d] * kr[i];
      }
#pragma unroll
      for (int mask = 16; mask > 0; mask /= 2) {
        partial += __shfl_xor_sync(0xffffffffu, partial, mask);
      }
      const float s = logit(a, partial);
      const float m_new = fmaxf(m[g], s);
      const float correction = ptx::exp2_approx(m[g] - m_new);
      const float p = ptx::exp2_approx(s - m_new);
      l[g] = l[g] * correction + p;
      m[g] = m_new;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) my_acc[g * D + d] = my_acc[g * D + d] * correction + p * vr[i];
      }
    }
  }
  ptx::allow_dependent_grids();
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < kGenericHeads; ++g) {
      red_m[warp * kGenericHeads + g] = m[g];
      red_l[warp * kGenericHeads + g] = l[g];
    }
  }
  __syncthreads();
  merge_warps_and_store<T>(a, red_m, red_l, acc, kGenericHeads, D, D, heads, head0, b, split);
}

// ---------------------------------------------------------------------------------------------
// Merge of split partials: one CTA of kMergeThreads per (sequence, query head).
//
// Thread t owns column t % cols (a float4 column where head_dim allows) of every groups-th split
// from t / cols on. It loads its splits' log-sum-exps and partial rows together, a batch of
// kMergeBatch splits at a time (one batch covers up to groups * kMergeBatch splits: 64 at
// head_dim 128), and merges them online; the groups' states then meet in shared memory.
constexpr int kMergeThreads = 512;
constexpr int kMergeBatch = 4;

struct MergeShape {
  int vec, cols, groups;
};

static_assert(kGenericMaxDim <= kMergeThreads, "a merge thread owns at most one column");

__host__ __device__ inline MergeShape merge_shape(int head_dim) {
  MergeShape m;
  m.vec = head_dim % 4 == 0 ? 4 : 1;
  m.cols = head_dim / m.vec;
  m.groups = kMergeThreads / m.cols;
  return m;
}

// Shared memory of the merge kernel: per group, its running max and weight, and its column sums.
std::size_t merge_smem_bytes(int head_dim) {
  const MergeShape m = merge_shape(head_dim);
  return std::size_t(m.groups) * (2 + head_dim) * sizeof(float);
}

template <int V>
struct MergeVec;
template <>
struct MergeVec<4> {
  using type = float4;
  static __device__ __forceinline__ float get(const float4& v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
  }
};
template <>
struct MergeVec<1> {
  using type = float;
  static __device__ __forceinline__ float get(float v, int) { return v; }
};

// Merges this thread's splits of column c online into (m, w, acc[V]), which stay as they were
// when its group has no split.
template <int V>
__device__ __forceinline__ void merge_column(const AttnArgs& a, const float* part,
                                             std::int64_t row, std::int64_t stride, int group,
                                             int groups, int c, float& m, float& w, float* acc) {
  using Vec = typename MergeVec<V>::type;
  const std::int64_t split_stride = stride * a.head_dim;
  for (int s0 = group; s0 < a.num_splits; s0 += groups * kMergeBatch) {
    float lse[kMergeBatch];
    Vec p[kMergeBatch];
#pragma unroll
    for (int i = 0; i < kMergeBatch; ++i) {  // every load of the batch before any use
      const int s = s0 + i * groups;
      lse[i] = s < a.num_splits ? a.part_lse[s * stride + row] : -INFINITY;
      if (s < a.num_splits) p[i] = *reinterpret_cast<const Vec*>(part + s * split_stride + V * c);
    }
#pragma unroll
    for (int i = 0; i < kMergeBatch; ++i) {
      if (lse[i] == -INFINITY) continue;  // an empty split, or none
      if (lse[i] > m) {
        const float correction = ptx::exp2_approx(m - lse[i]);  // 0 while m is -inf
        w *= correction;
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] *= correction;
        m = lse[i];
      }
      const float weight = ptx::exp2_approx(lse[i] - m);
      w += weight;
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += weight * MergeVec<V>::get(p[i], j);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kMergeThreads)
    merge_splits_kernel(const __grid_constant__ AttnArgs a) {
  extern __shared__ __align__(16) float merge_smem[];
  const MergeShape shape = merge_shape(a.head_dim);
  float* group_m = merge_smem;                 // [groups]
  float* group_w = group_m + shape.groups;     // [groups]
  float* sums = group_w + shape.groups;        // [groups][head_dim]
  TS_DIAG_MARK(ts_diag_merge_timeline, 0);
  ptx::wait_for_previous_grid();  // launched while the decode kernel finishes
  TS_DIAG_MARK(ts_diag_merge_timeline, 1);
  const int b = blockIdx.x / a.num_q_heads, h = blockIdx.x % a.num_q_heads;
  const std::int64_t stride = std::int64_t(a.batch) * a.num_q_heads;
  const std::int64_t row = std::int64_t(b) * a.num_q_heads + h;
  const float* part = a.part_out + row * a.head_dim;
  const int group = threadIdx.x / shape.cols, c = threadIdx.x % shape.cols;
  if (group < shape.groups) {
    float m = -INFINITY, w = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (shape.vec == 4) {
      merge_column<4>(a, part, row, stride, group, shape.groups, c, m, w, acc);
    } else {
      merge_column<1>(a, part, row, stride, group, shape.groups, c, m, w, acc);
    }
    for (int j = 0; j < shape.vec; ++j) sums[group * a.head_dim + shape.vec * c + j] = acc[j];
    if (c == 0) {  // every column of a group sees the same splits: one thread records them
      group_m[group] = m;
      group_w[group] = w;
    }
  }
  TS_DIAG_MARK(ts_diag_merge_timeline, 3);
  __syncthreads();
  TS_DIAG_MARK(ts_diag_merge_timeline, 4);
  // Every warp finds the largest group max and the total weight itself (lanes stride over the
  // groups, then shuffle), so no further barrier is needed; an empty group scales to 0.
  const int lane = threadIdx.x % 32;
  float m_all = -INFINITY;
  for (int g = lane; g < shape.groups; g += 32) m_all = fmaxf(m_all, group_m[g]);
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) {
    m_all = fmaxf(m_all, __shfl_xor_sync(0xffffffffu, m_all, mask));
  }
  auto scale_of = [&](int g) {
    const float mg = group_m[g];
    return mg == -INFINITY ? 0.0f : ptx::exp2_approx(mg - m_all);
  };
  float total = 0.0f;
  for (int g = lane; g < shape.groups; g += 32) total += group_w[g] * scale_of(g);
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) total += __shfl_xor_sync(0xffffffffu, total, mask);
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  T* out = static_cast<T*>(a.out) + b * a.out_stride_batch + h * a.out_stride_head;
  for (int d = threadIdx.x; d < a.head_dim; d += kMergeThreads) {
    float v = 0.0f;
#pragma unroll 8
    for (int g = 0; g < shape.groups; ++g) v += sums[g * a.head_dim + d] * scale_of(g);
    out[d] = from_float<T>(v * inv);
  }
  if (threadIdx.x == 0 && a.lse) {
    a.lse[b * a.lse_stride_batch + h * a.lse_stride_head] =
        total > 0.0f ? (m_all + log2f(total)) * kLn2 : -INFINITY;
  }
#if TS_DIAG_TIMELINE
  __syncthreads();
  TS_DIAG_MARK(ts_diag_merge_timeline, 2);
#endif
}

// ---------------------------------------------------------------------------------------------
// Host side

using KernelFn = void (*)(AttnArgs);

struct Launch {
  KernelFn kernel;
  int smem_bytes;
  int heads_per_cta;
};

template <class T, int D, int Stages>
Launch mma_launch_of() {
  return {decode_mma_kernel<T, D, Stages>, MmaConfig<D, Stages>::kSmemBytes, kMmaHeads};
}

// Split launches at head_dim 128 use fewer stages so that three CTAs share a multiprocessor: with
// the GPU filled by splits of one or a few sequences, the extra CTAs hide more of each one's
// start, end and arithmetic (measured on an H200: about one point of the read ceiling on one
// 128k-token sequence; unsplit batches gained nothing, and lose with the extra partial wave).
template <class T>
Launch mma_launch(int head_dim, bool split) {
  switch (head_dim) {
    case 64:
      return mma_launch_of<T, 64, 3>();
    case 128:
      return split ? mma_launch_of<T, 128, TS_SPLIT_STAGES_D128>() : mma_launch_of<T, 128, 3>();
    case 256:
      return mma_launch_of<T, 256, 3>();
    default:
      return {nullptr, 0, 0};
  }
}

int generic_smem_bytes(int head_dim) {
  return (kGenericHeads * head_dim * (1 + kWarps) + 2 * kWarps * kGenericHeads) * 4;
}

Launch generic_launch(DType dtype, int head_dim) {
  const int smem = generic_smem_bytes(head_dim);
  switch (dtype) {
    case DType::Float16:
      return {decode_generic_kernel<__half>, smem, kGenericHeads};
    case DType::BFloat16:
      return {decode_generic_kernel<__nv_bfloat16>, smem, kGenericHeads};
    default:
      return {decode_generic_kernel<float>, smem, kGenericHeads};
  }
}

// The tensor-core kernel's path, when the dtype and head_dim have one (alignment aside), for an
// unsplit or a split launch.
Launch preferred_launch(DType dtype, int head_dim, bool split) {
  if (dtype == DType::Float16) {
    Launch l = mma_launch<__half>(head_dim, split);
    if (l.kernel) return l;
  } else if (dtype == DType::BFloat16) {
    Launch l = mma_launch<__nv_bfloat16>(head_dim, split);
    if (l.kernel) return l;
  }
  return generic_launch(dtype, head_dim);
}

// Raises the kernel's dynamic shared-memory limit to the most any launch of it needs, once per
// (kernel, device), and returns how many CTAs of the given launch fit on one multiprocessor. The
// limit is one attribute per kernel, so it is never lowered for a smaller launch.
int prepare(const Launch& l, int max_smem_bytes, int device, const char* op) {
  struct Entry {
    KernelFn kernel;
    int device, smem, ctas;
  };
  static std::mutex mutex;
  static std::vector<Entry> prepared;
  static std::vector<std::pair<KernelFn, int>> raised;  // (kernel, device)
  std::lock_guard<std::mutex> lock(mutex);
  for (const Entry& e : prepared) {
    if (e.kernel == l.kernel && e.device == device && e.smem == l.smem_bytes) return e.ctas;
  }
  if (std::find(raised.begin(), raised.end(), std::make_pair(l.kernel, device)) == raised.end()) {
    check(
        cudaFuncSetAttribute(l.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_smem_bytes),
        op, "cudaFuncSetAttribute");
    raised.emplace_back(l.kernel, device);
  }
  int ctas = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, l.kernel, kThreads, l.smem_bytes), op,
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  ctas = std::max(ctas, 1);
  prepared.push_back({l.kernel, device, l.smem_bytes, ctas});
  return ctas;
}

// The largest dynamic shared memory a launch of l.kernel can ask for.
int max_smem(const Launch& l) {
  return l.heads_per_cta == kGenericHeads ? generic_smem_bytes(kGenericMaxDim) : l.smem_bytes;
}

bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void check_head_dim(int head_dim) {
  if (head_dim > kGenericMaxDim) {
    throw std::invalid_argument("tinyserve.paged_attention: head_dim must be at most " +
                                std::to_string(kGenericMaxDim) + " on CUDA, got " +
                                std::to_string(head_dim));
  }
}

}  // namespace

int plan_attention_splits(int device_index, DType dtype, int batch, int num_q_heads,
                          int num_kv_heads, int head_dim, std::int64_t max_kv_len) {
  const char* op = "plan_paged_attention";
  check_head_dim(head_dim);
  DeviceGuard guard(device_index, op);
  const int group = num_q_heads / num_kv_heads;
  const std::int64_t max_splits = std::clamp<std::int64_t>(max_kv_len / kMinSplitTokens, 1, 1024);
  // The cheapest split count for the kernel that a launch with (split) or without splits uses.
  // Cost of s splits for equal-length sequences: the waves of CTAs it takes, times each CTA's
  // work (its chunk of tokens plus a fixed cost, about two tiles of pipeline fill, that every
  // CTA and every split's merge pays). The cheapest s wins; ties go to fewer splits.
  auto best_splits = [&](const Launch& l) {
    const std::int64_t units =
        std::int64_t(batch) * num_kv_heads * ((group + l.heads_per_cta - 1) / l.heads_per_cta);
    const std::int64_t slots = std::int64_t(device_info(device_index).multiprocessors) *
                               prepare(l, max_smem(l), device_index, op);
    auto cost = [&](std::int64_t s) {
      const std::int64_t waves = (units * s + slots - 1) / slots;
      return double(waves) * (double(max_kv_len) / double(s) + kSplitOverheadTokens);
    };
    std::int64_t best = 1;
    double best_cost = cost(1);
    for (std::int64_t s = 2; s <= max_splits; ++s) {
      const double c = cost(s);
      if (c < best_cost) best = s, best_cost = c;
    }
    return best;
  };
  // Split only where the unsplit kernel would leave the GPU short of work; the split count is
  // then planned for the kernel that split launches use (more CTAs per multiprocessor at
  // head_dim 128), where that is another kernel.
  const Launch unsplit = preferred_launch(dtype, head_dim, false);
  const Launch split = preferred_launch(dtype, head_dim, true);
  const std::int64_t unsplit_best = best_splits(unsplit);
  if (unsplit_best == 1 || split.kernel == unsplit.kernel) return int(unsplit_best);
  return int(best_splits(split));
}

void paged_attention(const PagedAttentionParams& p, Stream stream) {
  const char* op = "paged_attention";
  check_head_dim(p.head_dim);
  if (std::int64_t(p.max_blocks) * p.block_size > INT32_MAX) {
    throw std::invalid_argument(
        "tinyserve.paged_attention: max_blocks * block_size must fit int32 on CUDA, got " +
        std::to_string(std::int64_t(p.max_blocks) * p.block_size));
  }
  if (p.batch > 65535) {
    throw std::invalid_argument(
        "tinyserve.paged_attention: batch must be at most 65535 on CUDA, "
        "got " +
        std::to_string(p.batch));
  }
  DeviceGuard guard(p.device_index, op);
  AttnArgs a{};
  a.query = p.query;
  a.q_stride_batch = p.q_stride_batch;
  a.q_stride_head = p.q_stride_head;
  a.k_cache = p.key_cache.data;
  a.v_cache = p.value_cache.data;
  a.k_stride_block = p.key_cache.stride_block;
  a.k_stride_token = p.key_cache.stride_token;
  a.k_stride_head = p.key_cache.stride_head;
  a.v_stride_block = p.value_cache.stride_block;
  a.v_stride_token = p.value_cache.stride_token;
  a.v_stride_head = p.value_cache.stride_head;
  a.block_table = p.block_table;
  a.block_table_stride = p.block_table_stride;
  a.seq_lens = p.seq_lens;
  a.out = p.out;
  a.out_stride_batch = p.out_stride_batch;
  a.out_stride_head = p.out_stride_head;
  a.lse = p.lse;
  a.lse_stride_batch = p.lse_stride_batch;
  a.lse_stride_head = p.lse_stride_head;
  a.num_blocks = p.num_blocks;
  a.max_blocks = p.max_blocks;
  a.batch = p.batch;
  a.num_q_heads = p.num_q_heads;
  a.head_dim = p.head_dim;
  a.block_size = p.block_size;
  a.block_shift =
      (p.block_size & (p.block_size - 1)) == 0 ? __builtin_ctz(unsigned(p.block_size)) : -1;
  a.group = p.num_q_heads / p.num_kv_heads;
  a.window_left = p.window_left;
  a.num_splits = p.num_splits;
  a.soft_cap = p.logits_soft_cap > 0.0f;
  a.pre = a.soft_cap ? p.scale / p.logits_soft_cap : p.scale * kLog2e;
  a.post = a.soft_cap ? p.logits_soft_cap * kLog2e : 1.0f;
  if (p.num_splits > 1) {
    a.part_out = static_cast<float*>(p.workspace);
    a.part_lse = reinterpret_cast<float*>(
        static_cast<char*>(p.workspace) +
        attention_partials_bytes(p.num_splits, p.batch, p.num_q_heads, p.head_dim));
  }

  Launch l = preferred_launch(p.dtype, p.head_dim, p.num_splits > 1);
  if (l.heads_per_cta == kMmaHeads) {
    // The tensor-core kernel moves 16-byte rows: every row start must be 16-byte aligned.
    const bool ok = aligned16(p.query) && aligned16(p.key_cache.data) &&
                    aligned16(p.value_cache.data) && p.q_stride_batch % 8 == 0 &&
                    p.q_stride_head % 8 == 0 && p.key_cache.stride_block % 8 == 0 &&
                    p.key_cache.stride_token % 8 == 0 && p.key_cache.stride_head % 8 == 0 &&
                    p.value_cache.stride_block % 8 == 0 && p.value_cache.stride_token % 8 == 0 &&
                    p.value_cache.stride_head % 8 == 0;
    if (!ok) l = generic_launch(p.dtype, p.head_dim);
  }
  prepare(l, max_smem(l), p.device_index, op);
  a.head_tiles = (a.group + l.heads_per_cta - 1) / l.heads_per_cta;
  cudaStream_t s = as_stream(stream);
  // The KV heads of one sequence run side by side: in NHD storage they read neighbouring slices
  // of the same token rows.
  const dim3 grid(unsigned(p.num_kv_heads * a.head_tiles), unsigned(p.num_splits),
                  unsigned(p.batch));
  launch(reinterpret_cast<const void*>(l.kernel), grid, dim3(kThreads), std::size_t(l.smem_bytes),
         s, a, op, "decode kernel");
  if (p.num_splits > 1 && !TS_DIAG_NO_MERGE) {
    const std::size_t smem = merge_smem_bytes(p.head_dim);
    const void* merge = p.dtype == DType::Float16
                            ? reinterpret_cast<const void*>(merge_splits_kernel<__half>)
                        : p.dtype == DType::BFloat16
                            ? reinterpret_cast<const void*>(merge_splits_kernel<__nv_bfloat16>)
                            : reinterpret_cast<const void*>(merge_splits_kernel<float>);
    launch_after(merge, dim3(unsigned(p.batch * p.num_q_heads)), dim3(kMergeThreads), smem, s, a,
                 device_info(p.device_index).compute_capability >= 90, op, "merge_splits_kernel");
  }
}

}  // namespace tinyserve::kernels::cuda
